import pytest
import torch

from sae_tune.autotune.candidates import Candidate, baselines, search_space
from sae_tune.specs import spec_from_shape
from sae_tune.targets.cpu import CpuVariant
from sae_tune.targets.library.paths import TORCH_PATHS
from sae_tune.targets.triton import overflow_impossible_or_handled
from sae_tune.targets.triton.variant import Variant

TRITON = "triton"
JUMPRELU = spec_from_shape(4096, 256, 32)
TOPK = spec_from_shape(4096, 256, 64, arch="topk", k=64)


def _variants(space):
    return [Variant.from_dict(c) for c in space.configs.get(TRITON, ())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_space_has_library_paths_and_c_variants_and_no_truncating_path_for_jumprelu(dtype):
    space = search_space(JUMPRELU, 32, dtype, torch.device("cpu"), (128, 256))
    assert TRITON not in space.impls  # interpreter timings are never speed
    assert "dense" in space.impls and "embedding_bag_topk" not in space.impls
    assert "cpu" in space.impls and len(space.configs["cpu"]) >= 100
    assert all(CpuVariant.from_dict(c).to_dict() == c for c in space.configs["cpu"])
    assert space.values("embedding_bag_csr", "chunk") == [None, 16]
    for impl in space.impls:
        if impl in TORCH_PATHS:
            assert TORCH_PATHS[impl].supports(dtype, "cpu")


def test_topk_sae_may_use_fixed_k_with_its_own_k():
    space = search_space(TOPK, 8, torch.float32, torch.device("cpu"), (128,))
    assert space.configs["embedding_bag_topk"] == ({"k": 64},)


def test_cuda_space_gates_overflow_policies():
    """On CUDA, JumpReLU gets exact and fallback variants only; TopK also validate/unchecked with cap >= k."""
    jr = _variants(search_space(JUMPRELU, 32, torch.float32, torch.device("cuda"), (96, 160)))
    assert jr
    assert {v.overflow for v in jr if v.alloc == "fixed"} == {"fallback"}
    assert {v.max_l0 for v in jr if v.alloc == "fixed"} == {96, 160}
    tk = _variants(search_space(TOPK, 32, torch.float32, torch.device("cuda"), (32,)))
    unsafe = [v for v in tk if v.alloc == "fixed" and v.overflow != "fallback"]
    assert unsafe and all(v.max_l0 >= 64 for v in unsafe)
    assert any(v.overflow == "unchecked" for v in unsafe)
    cuda = search_space(JUMPRELU, 32, torch.float32, torch.device("cuda"), (96,))
    assert "cpu" not in cuda.impls  # the C kernels run on CPU tensors only


def test_overflow_gate():
    assert overflow_impossible_or_handled(Variant(), None)
    assert overflow_impossible_or_handled(Variant(alloc="fixed", overflow="fallback", max_l0=8), None)
    assert not overflow_impossible_or_handled(Variant(alloc="fixed", overflow="validate", max_l0=8), None)
    assert not overflow_impossible_or_handled(Variant(alloc="fixed", overflow="unchecked", max_l0=8), 16)
    assert overflow_impossible_or_handled(Variant(alloc="fixed", overflow="unchecked", max_l0=16), 16)


def test_candidates_are_hashable_labelled_and_contained():
    space = search_space(JUMPRELU, 64, torch.float32, torch.device("cpu"), (128,))
    a = Candidate.of("embedding_bag_csr", {"chunk": 16})
    assert a == Candidate.of("embedding_bag_csr", {"chunk": 16}) and hash(a)
    assert a.label == "embedding_bag_csr[chunk=16]"
    assert space.contains(a)
    assert not space.contains(Candidate.of("embedding_bag_csr", {"chunk": 17}))
    assert not space.contains(Candidate.of(TRITON, Variant().to_dict()))
    assert Candidate.of(TRITON, Variant().to_dict()).label == f"triton[{Variant().name}]"
    c = CpuVariant()
    assert Candidate.of("cpu", c.to_dict()).label == f"cpu[{c.name}]"


def test_library_baselines_build_and_match_dense():
    acts = torch.zeros(4, 512)
    acts[:, ::50] = 1.5
    W = torch.randn(512, 32)
    for cand in baselines(torch.float32, torch.device("cpu")):
        out = cand.build()(acts, W, None)
        torch.testing.assert_close(out, acts @ W, rtol=1e-5, atol=1e-5)
