import pytest
import torch
from conftest import DTYPES, random_acts, random_weights

from sae_tune.autotune.verify import Reference, check


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, F, D, l0", [(4, 512, 64, 10), (16, 2048, 96, 40)])
def test_dense_passes_and_perturbed_results_fail(dtype, B, F, D, l0):
    acts = random_acts(B, F, l0, dtype)
    W, b = random_weights(F, D, dtype)
    ref = Reference.of(acts, W, b)
    dense = acts @ W + b
    assert check(dense, ref, dtype).ok
    wrong = dense.clone()
    wrong[1, 3] += ref.scale[1, 3].to(dtype) * 0.2  # far beyond any rounding
    verdict = check(wrong, ref, dtype)
    assert not verdict.ok and "tolerance" in verdict.reason
    dropped = (acts.clone().index_fill_(1, acts[0].nonzero()[0], 0) @ W) + b  # one feature dropped
    assert not check(dropped, ref, dtype).ok


def test_wrong_shape_dtype_and_nan_pattern_are_named():
    acts = random_acts(2, 256, 4, torch.float32)
    W, _ = random_weights(256, 8, torch.float32)
    ref = Reference.of(acts, W)
    out = acts @ W
    assert "shape" in check(out[:1], ref, torch.float32).reason
    assert "dtype" in check(out.half(), ref, torch.float32).reason
    nan = out.clone()
    nan[0, 0] = float("nan")
    assert "NaN" in check(nan, ref, torch.float32).reason
    assert "tensor" in check(None, ref, torch.float32).reason  # type: ignore[arg-type]
