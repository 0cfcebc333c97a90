"""SAELens forwards sparse end to end: encode -> SparseActs -> decode with no dense (tokens x features)
tensor when nothing needs it; with activation hooks, autograd, error terms or other architectures, the
output and every hook's tensors are those of SAELens's own forward."""

import pytest
import torch
from conftest import TOLERANCE
from torch.utils._python_dispatch import TorchDispatchMode

sae_lens = pytest.importorskip("sae_lens")

from test_saelens import inputs, make_sae  # noqa: E402

import sae_tune  # noqa: E402
import sae_tune.encode  # noqa: E402
from sae_tune import SparseActs  # noqa: E402
from sae_tune.integrations.saelens_sparse import dense_reason  # noqa: E402

ARCHS = ("jumprelu", "topk", "standard")
F, D = 4096, 64


class LargestFeatureTensor(TorchDispatchMode):
    """Records the most elements of any op result whose last dimension is F (the SAE's width)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == F:
                self.largest = max(self.largest, t.numel())
        return out


def both(sae, x):
    """(patched forward, SAELens's own forward) under no_grad."""
    with torch.no_grad():
        out = sae(x)
        with sae_tune.unpatched():
            ref = sae(x)
    return out, ref


def assert_close(out, ref):
    tol = TOLERANCE[out.dtype] * 4 * (ref.abs().max().item() + 1)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert (out.double() - ref.double()).abs().max().item() <= tol


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_without_hooks_is_sparse_and_matches(arch, dtype, monkeypatch):
    monkeypatch.setattr(sae_tune.encode, "CHUNK_ELEMENTS", 24 * 256)  # chunks of 256 features
    sae = make_sae(arch, F, D, dtype)
    x = inputs(D, dtype, shape=(4, 6))
    assert dense_reason(sae, x) is not None  # parameters require grad and autograd records
    with torch.no_grad():
        assert dense_reason(sae, x) is None
        with LargestFeatureTensor() as seen:
            out = sae(x)
    assert seen.largest < 24 * F  # chunks only: never the (24, F) activations
    _, ref = both(sae, x)
    assert_close(out, ref)
    with LargestFeatureTensor() as dense, torch.no_grad(), sae_tune.unpatched():
        sae(x)
    assert dense.largest == 24 * F


@pytest.mark.parametrize("arch", ARCHS)
def test_hooks_see_the_same_tensors_and_steer_the_same(arch):
    sae = make_sae(arch, F, D, torch.float32)
    x = inputs(D, torch.float32)
    seen = {True: [], False: []}
    state = {"patched": True}

    def record(t, hook):
        seen[state["patched"]].append((hook.name, t.clone()))

    def steer(t, hook):
        t = t.clone()
        t[..., 7] = 3.0  # a steering edit on the activations
        return t

    sae.hook_sae_acts_pre.add_hook(record)
    sae.hook_sae_acts_post.add_hook(steer)
    sae.hook_sae_acts_post.add_hook(record)
    assert dense_reason(sae, x) is not None
    with torch.no_grad():
        out = sae(x)
        state["patched"] = False
        with sae_tune.unpatched():
            ref = sae(x)
    sae.reset_hooks()
    assert [n for n, _ in seen[True]] == ["hook_sae_acts_pre", "hook_sae_acts_post"]
    for (_, a), (_, b) in zip(seen[True], seen[False], strict=True):
        assert torch.equal(a, b)
    assert_close(out, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_autograd_runs_saelens_forward_with_its_gradients(arch):
    sae = make_sae(arch, F, D, torch.float32)
    x = inputs(D, torch.float32)
    out = sae(x)
    out.sum().backward()
    grad = sae.W_enc.grad.clone()
    sae.zero_grad()
    with sae_tune.unpatched():
        sae(x).sum().backward()
    assert torch.allclose(grad, sae.W_enc.grad, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_error_term_matches(arch):
    sae = make_sae(arch, F, D, torch.float32)
    sae._use_error_term = True  # as HookedSAETransformer.add_sae(..., use_error_term=True) sets it
    x = inputs(D, torch.float32)
    errors = []
    sae.hook_sae_error.add_hook(lambda t, hook: errors.append(t.clone()))
    with torch.no_grad():
        assert dense_reason(sae, x) is None
    out, ref = both(sae, x)
    assert_close(out, ref)
    assert_close(out, x)  # the error term restores the input
    assert len(errors) == 2
    assert_close(errors[0], errors[1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
def test_normalisation_kept(arch, norm):
    sae = make_sae(arch, F, D, torch.float32, normalize_activations=norm)
    x = inputs(D, torch.float32) * 5
    with torch.no_grad():
        assert dense_reason(sae, x) is None
    out, ref = both(sae, x)
    assert_close(out, ref)


def test_architectures_that_need_their_own_code_stay_dense():
    x = inputs(D, torch.float32)
    rescaled = make_sae("topk", F, D, torch.float32, rescale_acts_by_decoder_norm=True)
    abstopk = sae_lens.AbsTopKSAE(sae_lens.AbsTopKSAEConfig(d_in=D, d_sae=F, k=20))

    class Custom(sae_lens.JumpReLUSAE):
        def encode(self, x):
            return super().encode(x) * 2

    custom = Custom(sae_lens.JumpReLUSAEConfig(d_in=D, d_sae=F))
    custom.load_state_dict(make_sae("jumprelu", F, D, torch.float32).state_dict())
    for sae, why in (
        (rescaled, "rescale_acts_by_decoder_norm"),
        (abstopk, "not TopK"),
        (custom, "overrides encode"),
        (make_sae("gated", F, D, torch.float32), "not a studied SAELens class"),
    ):
        with torch.no_grad():
            assert why in dense_reason(sae, x)
        out, ref = both(sae, x)
        assert_close(out, ref)


def test_sparse_features_yield_saelens_nonzeros():
    for arch in (*ARCHS, "gated"):
        sae = make_sae(arch, F, D, torch.float32)
        batches = [inputs(D, torch.float32, seed=s, shape=(3, 4)) for s in range(3)]
        got = list(sae_tune.sparse_features(sae, batches))
        assert len(got) == 3
        for acts, x in zip(got, batches, strict=True):
            assert isinstance(acts, SparseActs) and acts.shape == (3, 4, F)
            with torch.no_grad():
                ref = SparseActs.from_dense(sae.encode(x))
            assert torch.equal(acts.offsets, ref.offsets) and torch.equal(acts.indices, ref.indices)
            assert torch.equal(acts.values, ref.values)
    with pytest.raises(TypeError, match="for one tensor x pass \\[x\\]"):
        next(sae_tune.sparse_features(sae, batches[0]))
    with pytest.raises(TypeError, match="takes a SAELens SAE"):
        next(sae_tune.sparse_features(object(), batches))


def test_unpatch_restores_saelens_forward():
    sae_tune.unpatch()
    try:
        for cls in (sae_lens.JumpReLUSAE, sae_lens.TopKSAE, sae_lens.StandardSAE):
            assert "forward" not in cls.__dict__ and cls.forward is sae_lens.SAE.forward
    finally:
        sae_tune.patch()
    assert "forward" in sae_lens.JumpReLUSAE.__dict__
