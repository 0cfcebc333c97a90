import pytest
import torch

from sae_tune.inputs import check_decode_inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)], ids=str)
def test_valid_inputs_flatten_to_tokens(dtype, lead):
    acts = torch.zeros(*lead, 16, dtype=dtype)
    W = torch.zeros(16, 8, dtype=dtype)
    got = check_decode_inputs(acts, W, torch.zeros(8, dtype=dtype))
    n = 1
    for s in lead:
        n *= s
    assert got.acts.shape == (n, 16) and got.lead_shape == lead
    assert (got.F, got.D, got.out_dtype) == (16, 8, dtype)


@pytest.mark.parametrize(
    "acts, W, b, error, words",
    [
        (torch.zeros(4, 15), torch.zeros(16, 8), None, ValueError, ["15", "16"]),
        (torch.zeros(4, 16), torch.zeros(16), None, ValueError, ["2-D", "(16,)"]),
        (torch.zeros(4, 16), torch.zeros(16, 8), torch.zeros(7), ValueError, ["(8,)", "(7,)"]),
        (torch.zeros(4, 16, dtype=torch.int64), torch.zeros(16, 8), None, TypeError, ["int64"]),
        (torch.zeros(4, 16), torch.zeros(16, 8, dtype=torch.int32), None, TypeError, ["int32"]),
        (
            torch.zeros(4, 16, dtype=torch.float16),
            torch.zeros(16, 8),
            None,
            TypeError,
            ["float16", "float32"],
        ),
        (torch.zeros(4, 16), torch.zeros(16, 8, device="meta"), None, ValueError, ["meta", "cpu"]),
        (torch.zeros(4, 16), torch.zeros(16, 8), torch.zeros(8, device="meta"), ValueError, ["meta"]),
        ([[0.0] * 16], torch.zeros(16, 8), None, TypeError, ["Tensor"]),
        (torch.tensor(1.0), torch.zeros(16, 8), None, ValueError, ["dimension"]),
    ],
)
def test_bad_inputs_name_what_is_wrong(acts, W, b, error, words):
    with pytest.raises(error) as info:
        check_decode_inputs(acts, W, b)
    for word in words:
        assert word in str(info.value)
