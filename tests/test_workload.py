"""Synthetic workloads have the L0 spread and skew they claim; loading and calibration refuse bad data."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys

import numpy as np
import pytest
import torch

from sae_tune.autotune.workload import (
    L0Stats,
    WorkloadError,
    calibrate_l0,
    load_acts,
    max_l0_candidates,
    synthetic_acts,
)
from sae_tune.specs import get_spec, spec_from_shape

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _row_l0(acts: torch.Tensor) -> torch.Tensor:
    return torch.count_nonzero(acts, dim=1)


# --- synthetic activations ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_shape_dtype_and_reproducibility(dtype):
    spec = spec_from_shape(2048, 64, 24)
    a = synthetic_acts(spec, 17, dtype=dtype, seed=3)
    assert a.shape == (17, 2048) and a.dtype == dtype and a.device.type == "cpu"
    assert torch.equal(a, synthetic_acts(spec, 17, dtype=dtype, seed=3))
    assert not torch.equal(a, synthetic_acts(spec, 17, dtype=dtype, seed=4))
    # the same draw in every dtype: identical sparsity pattern, values equal up to rounding
    a32 = synthetic_acts(spec, 17, dtype=torch.float32, seed=3)
    assert torch.equal(a != 0, a32 != 0)
    torch.testing.assert_close(a.float(), a32, rtol=1e-2, atol=0)


def test_empty_batch():
    a = synthetic_acts(get_spec("gemma-2b-l20-16k"), 0, dtype=torch.bfloat16)
    assert a.shape == (0, 16384) and a.dtype == torch.bfloat16


def test_l0_spread_has_the_right_mean_and_a_heavy_tail():
    a = synthetic_acts((4096, 40), 4000, seed=0)
    stats = calibrate_l0(a)
    assert abs(stats.mean - 40) < 2.0
    assert stats.median < stats.mean  # lognormal: right-skewed
    assert stats.p99 > 2.2 * stats.mean  # sigma=0.5: p99 ~ 2.8x the mean
    assert stats.max > 3.5 * stats.mean  # some tokens fire several times the mean
    assert int(_row_l0(a).min()) >= 1
    assert (a >= 0).all() and (a[a != 0] >= 0.05).all()  # JumpReLU: nothing below the lowest threshold


def test_sigma_zero_and_topk_fire_exactly_l0():
    flat = synthetic_acts((1024, 30), 64, seed=1, sigma=0.0)
    assert (_row_l0(flat) == 30).all()
    topk = synthetic_acts(get_spec("qwen3.5-2b-topk50"), 8, seed=1)
    assert (_row_l0(topk) == 50).all() and (topk >= 0).all()


def test_feature_frequencies_are_skewed_unless_zipf_is_off():
    def top_share(acts: torch.Tensor) -> float:
        fires = (acts != 0).sum(0).double()
        top = fires.sort(descending=True).values[: acts.shape[1] // 100]
        return float(top.sum() / fires.sum())

    skewed = synthetic_acts((8192, 32), 512, seed=2)
    uniform = synthetic_acts((8192, 32), 512, seed=2, zipf_exponent=0.0)
    assert top_share(skewed) > 0.25  # the top 1% of features carry >25x their uniform share
    assert top_share(uniform) < 0.05  # only Poisson noise above 1%
    # hot features are scattered over W_dec, not the first rows
    hottest = int((skewed != 0).sum(0).argmax())
    assert hottest != 0


def test_extreme_skew_falls_back_to_exact_sampling():
    # With exponent 8, rank-60 features are ~1e-14 as likely as rank 1: repeated draws cannot find 60
    # distinct features, so the Gumbel-top-k fallback must still deliver exactly 60 per token.
    a = synthetic_acts((64, 60), 12, seed=5, sigma=0.0, zipf_exponent=8.0)
    assert (_row_l0(a) == 60).all()


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (((64, 0), 4), {}, "1 <= l0 <= width"),
        (((64, 65), 4), {}, "1 <= l0 <= width"),
        (((64.0, 8), 4), {}, "tuple of ints"),
        (("gemma-2b-l20", 4), {}, "SAESpec or a"),
        (((64, 8), -1), {}, "batch_size"),
        (((64, 8), 4), {"dtype": torch.int32}, "dtype"),
        (((64, 8), 4), {"seed": 1.5}, "seed"),
        (((64, 8), 4), {"sigma": -0.1}, "sigma"),
        (((64, 8), 4), {"zipf_exponent": float("nan")}, "zipf_exponent"),
    ],
)
def test_synthetic_acts_rejects_bad_arguments(args, kwargs, message):
    with pytest.raises(WorkloadError, match=message):
        synthetic_acts(*args, **kwargs)


# --- calibration ---------------------------------------------------------------------------------------


def test_calibrate_l0_on_known_counts():
    n = 1000
    acts = torch.zeros(n, n)
    for i in range(n):
        acts[i, :i] = -1.0 if i % 2 else 2.0  # negative values count as fired too
    stats = calibrate_l0(acts.reshape(10, 100, n))  # N-D is flattened to tokens
    assert stats == L0Stats(mean=499.5, median=499, p90=899, p99=989, p999=998, max=999, n_tokens=n)


def test_calibrate_l0_rejects_non_activations():
    with pytest.raises(WorkloadError, match="zero tokens"):
        calibrate_l0(torch.zeros(0, 8))
    with pytest.raises(WorkloadError, match="shape"):
        calibrate_l0(torch.zeros(8))
    with pytest.raises(WorkloadError, match="torch.Tensor"):
        calibrate_l0([[1.0, 0.0]])  # type: ignore[arg-type]


def _stats(p99: int, p999: int, mx: int) -> L0Stats:
    return L0Stats(mean=float(p99) / 2, median=p99 // 2, p90=p99, p99=p99, p999=p999, max=mx)


def test_max_l0_candidates_round_up_dedupe_and_sort():
    assert max_l0_candidates(_stats(100, 130, 250)) == (112, 144, 256)
    assert max_l0_candidates(_stats(100, 130, 250), pow2=True) == (128, 256)
    assert max_l0_candidates(_stats(50, 50, 64)) == (64,)
    assert max_l0_candidates(_stats(0, 0, 0)) == (16,)
    assert max_l0_candidates(_stats(100, 130, 250), multiple=32) == (128, 160, 256)
    assert max_l0_candidates(_stats(100, 130, 250), limit=200) == (112, 144, 200)
    for bad in ({"multiple": 0}, {"multiple": 16.0}, {"limit": 0}):
        with pytest.raises(WorkloadError):
            max_l0_candidates(_stats(1, 2, 3), **bad)


def test_candidates_from_a_synthetic_workload_cover_every_token():
    stats = calibrate_l0(synthetic_acts(get_spec("gemma-2b-l20"), 256, seed=0))
    caps = max_l0_candidates(stats)
    assert caps == tuple(sorted(set(caps))) and all(c % 16 == 0 for c in caps)
    assert caps[0] >= stats.p99 and caps[-1] >= stats.max


# --- loading real activations --------------------------------------------------------------------------


def _acts() -> torch.Tensor:
    return synthetic_acts((256, 12), 10, seed=7)


def test_load_pt_tensor_and_mapping(tmp_path):
    acts = _acts()
    torch.save(acts, tmp_path / "a.pt")
    assert torch.equal(load_acts(tmp_path / "a.pt"), acts)
    torch.save({"feature_acts": acts.reshape(2, 5, 256)}, tmp_path / "b.pth")
    assert torch.equal(load_acts(tmp_path / "b.pth", width=256), acts)
    torch.save({"x": acts, "y": acts * 2}, tmp_path / "c.pt")
    with pytest.raises(WorkloadError, match=r"c\.pt: holds 2 tensors \(x, y\)"):
        load_acts(tmp_path / "c.pt")
    assert torch.equal(load_acts(tmp_path / "c.pt", key="y"), acts * 2)
    with pytest.raises(WorkloadError, match="no tensor named 'z'"):
        load_acts(tmp_path / "c.pt", key="z")
    with pytest.raises(WorkloadError, match="leave key unset"):
        load_acts(tmp_path / "a.pt", key="x")


class _Payload:
    """Stands in for any pickled object that is not plain tensors."""


def test_load_pt_refuses_arbitrary_objects(tmp_path):
    torch.save({"acts": _acts(), "payload": _Payload()}, tmp_path / "obj.pt")
    with pytest.raises(WorkloadError, match=r"obj\.pt: cannot be read.*weights_only"):
        load_acts(tmp_path / "obj.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip or pickle")
    with pytest.raises(WorkloadError, match="junk.pt"):
        load_acts(tmp_path / "junk.pt")


def test_load_sparse_tensor_is_densified(tmp_path):
    acts = _acts()
    torch.save(acts.to_sparse(), tmp_path / "s.pt")
    assert torch.equal(load_acts(tmp_path / "s.pt"), acts)


def test_load_npy(tmp_path):
    acts = _acts()
    np.save(tmp_path / "a.npy", acts.numpy().astype(np.float16))
    loaded = load_acts(tmp_path / "a.npy")
    assert loaded.dtype == torch.float16 and torch.equal(loaded.float(), acts.half().float())
    np.save(tmp_path / "i.npy", np.ones((2, 3), dtype=np.int32))
    with pytest.raises(WorkloadError, match=r"i\.npy: activations must be floating point"):
        load_acts(tmp_path / "i.npy")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(WorkloadError, match=r"o\.npy: cannot be read.*pickled"):
        load_acts(tmp_path / "o.npy")


@pytest.mark.parametrize(
    "tensor, message",
    [
        (torch.ones(5), r"must be \(tokens, F\)"),
        (torch.ones(3, 0), "no features"),
        (torch.ones(3, 4, dtype=torch.int64), "must be float16, bfloat16, float32 or float64"),
        (torch.tensor([[0.0, float("nan")], [float("inf"), 1.0]]), "2 activation value"),
    ],
)
def test_load_rejects_invalid_tensors(tmp_path, tensor, message):
    torch.save(tensor, tmp_path / "bad.pt")
    with pytest.raises(WorkloadError, match=message) as info:
        load_acts(tmp_path / "bad.pt")
    assert "bad.pt" in str(info.value)


def test_load_rejects_missing_files_unknown_types_and_wrong_width(tmp_path):
    with pytest.raises(WorkloadError, match="no such file"):
        load_acts(tmp_path / "none.pt")
    (tmp_path / "a.csv").write_text("1,2\n")
    with pytest.raises(WorkloadError, match="unsupported file type '.csv'"):
        load_acts(tmp_path / "a.csv")
    torch.save(_acts(), tmp_path / "a.pt")
    with pytest.raises(WorkloadError, match="256 features, the SAE has 512"):
        load_acts(tmp_path / "a.pt", width=512)


def _write_safetensors(path, name: str, tensor: torch.Tensor) -> None:
    """A minimal safetensors file written by hand (8-byte header size, JSON header, raw data)."""
    data = tensor.contiguous().numpy().tobytes()
    header = json.dumps({name: {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [0, len(data)]}})
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_load_safetensors_or_a_clear_missing_package_error(tmp_path, monkeypatch):
    acts = _acts()
    _write_safetensors(tmp_path / "a.safetensors", "acts", acts)
    if importlib.util.find_spec("safetensors") is not None:
        assert torch.equal(load_acts(tmp_path / "a.safetensors"), acts)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(WorkloadError, match=r"a\.safetensors: reading \.safetensors needs .*pip install"):
        load_acts(tmp_path / "a.safetensors")
