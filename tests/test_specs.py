"""SAE presets, explicit shapes and local SAELens configs: right numbers in, named errors out."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from sae_tune.specs import (
    ARCHS,
    DEFAULT_L0_FRACTION,
    PRESETS,
    L0Origin,
    SAESpec,
    SpecError,
    get_spec,
    list_specs,
    read_saelens_dir,
    spec_from_saelens_dir,
    spec_from_shape,
)


def test_reference_preset_is_gemma_scope_2b_layer_20_65k():
    spec = get_spec("gemma-2b-l20")
    assert (spec.width, spec.d_model, spec.arch) == (65536, 2304, "jumprelu")
    assert 60 <= spec.l0 <= 80
    assert spec.release == "gemma-scope-2b-pt-res-canonical"
    assert spec.sae_id == "layer_20/width_65k/canonical"
    assert spec.k is None


@pytest.mark.parametrize(
    "prefix, widths, d_model",
    [
        ("gemma-2b-l12", {16384, 65536, 262144}, 2304),
        ("gemma-2b-l20", {16384, 65536}, 2304),
        ("gemma-9b-l20", {16384, 131072}, 3584),
        ("gemma-27b-l22", {131072}, 4608),
        ("llama-8b", {32768, 131072}, 4096),
    ],
)
def test_families_cover_their_published_widths(prefix, widths, d_model):
    family = [s for s in list_specs() if s.name.startswith(prefix)]
    assert {s.width for s in family} == widths
    assert {s.d_model for s in family} == {d_model}


def test_every_preset_is_consistent():
    specs = list_specs()
    assert len({s.name for s in specs}) == len(specs) == len(PRESETS)
    for spec in specs:
        assert PRESETS[spec.name] is spec
        assert 0 < spec.density < 0.01, spec.name  # real SAEs fire well under 1% of features
        if spec.release and spec.release.startswith("gemma-scope-") and "canonical" not in spec.release:
            assert spec.sae_id.endswith(f"average_l0_{spec.l0}"), spec.name
        if spec.arch == "topk":
            assert spec.k == spec.l0
    qwen = [s for s in specs if s.name.startswith("qwen")]
    assert qwen and all(s.arch == "topk" and s.release is None for s in qwen)


def test_get_spec_is_case_insensitive_and_suggests_close_names():
    assert get_spec("  GEMMA-2B-L20 ") is PRESETS["gemma-2b-l20"]
    with pytest.raises(SpecError, match="did you mean: .*gemma-2b-l20"):
        get_spec("gemma-2b-l2O")
    with pytest.raises(SpecError, match="known presets: .*llama-8b-l15-8x"):
        get_spec("zzzz")
    with pytest.raises(SpecError, match="must be a string"):
        get_spec(20)  # type: ignore[arg-type]


def test_spec_is_frozen():
    spec = get_spec("gemma-2b-l20")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.width = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"width": 0}, "width"),
        ({"width": 16.0}, "width"),
        ({"width": True}, "width"),
        ({"d_model": -1}, "d_model"),
        ({"l0": 0}, "l0"),
        ({"l0": 5000}, "l0"),
        ({"l0": 7.5}, "l0"),
        ({"arch": "gated"}, "arch"),
        ({"name": ""}, "name"),
        ({"release": ""}, "release"),
        ({"sae_id": "layer_1"}, "sae_id"),
        ({"k": 8}, "k"),
        ({"arch": "topk"}, "k"),
        ({"arch": "topk", "k": 4097}, "k"),
        ({"arch": "topk", "k": 16}, "l0"),
    ],
)
def test_spec_validation_names_the_field(kwargs, field):
    base = {"name": "x", "width": 4096, "d_model": 256, "l0": 32}
    with pytest.raises(SpecError, match=rf"SAESpec\.{field}"):
        SAESpec(**{**base, **kwargs})


def test_spec_from_shape():
    spec = spec_from_shape(4096, 512, 32)
    assert (spec.width, spec.d_model, spec.l0, spec.arch, spec.k) == (4096, 512, 32, "jumprelu", None)
    assert spec.name == "custom-f4096-d512-l0-32"
    topk = spec_from_shape(4096, 512, 32, "topk")
    assert (topk.arch, topk.k, topk.l0) == ("topk", 32, 32)
    assert spec_from_shape(8, 4, 8, name="tiny").name == "tiny"
    assert set(ARCHS) == {"jumprelu", "topk", "relu"}
    with pytest.raises(SpecError, match="l0"):
        spec_from_shape(16, 4, 17)
    with pytest.raises(SpecError, match="d_model"):
        spec_from_shape(16, 0, 4)


# --- local SAELens directories ----------------------------------------------------------------------


def _sae_dir(root: Path, cfg: object, name: str = "sae", raw: str | None = None) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(raw if raw is not None else json.dumps(cfg))
    return path


def test_saelens_jumprelu_dir_uses_average_l0_folder_name(tmp_path):
    path = _sae_dir(tmp_path, {"d_in": 2304, "d_sae": 65536, "architecture": "jumprelu"}, "average_l0_61")
    spec = spec_from_saelens_dir(path)
    assert (spec.width, spec.d_model, spec.l0, spec.arch, spec.k) == (65536, 2304, 61, "jumprelu", None)
    assert spec.name == "saelens:average_l0_61"
    assert spec.release is None and spec.sae_id is None


def test_saelens_dir_l0_sources_in_order(tmp_path):
    cfg = {"d_in": 512, "d_sae": 16384, "architecture": "jumprelu"}
    plain = _sae_dir(tmp_path, cfg, "plain")
    assert spec_from_saelens_dir(plain).l0 == round(16384 * DEFAULT_L0_FRACTION)
    assert spec_from_saelens_dir(plain, l0=40).l0 == 40
    with_l0 = _sae_dir(tmp_path, {**cfg, "l0": 70.6}, "average_l0_12")
    assert spec_from_saelens_dir(with_l0).l0 == 71  # the config's own number beats the folder name
    with pytest.raises(SpecError, match="SAESpec.l0"):
        spec_from_saelens_dir(plain, l0=20000)


@pytest.mark.parametrize(
    "cfg",
    [
        {"d_in": 2048, "d_sae": 32768, "architecture": "topk", "k": 50},
        {"d_in": 2048, "d_sae": 32768, "architecture": "topk", "activation_fn_kwargs": {"k": 50}},
        {
            "d_in": 2048,
            "d_sae": 32768.0,
            "architecture": "standard",
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": 50.0},
        },
    ],
)
def test_saelens_topk_dir(tmp_path, cfg):
    spec = spec_from_saelens_dir(_sae_dir(tmp_path, cfg))
    assert (spec.width, spec.d_model, spec.arch, spec.k, spec.l0) == (32768, 2048, "topk", 50, 50)


def test_saelens_standard_gated_and_batchtopk_map_to_decode_archs(tmp_path):
    base = {"d_in": 64, "d_sae": 1024}
    assert spec_from_saelens_dir(_sae_dir(tmp_path, base, "a")).arch == "relu"  # default "standard"
    assert spec_from_saelens_dir(_sae_dir(tmp_path, {**base, "architecture": "gated"}, "b")).arch == "relu"
    batch = spec_from_saelens_dir(_sae_dir(tmp_path, {**base, "architecture": "batchtopk", "k": 24}, "c"))
    assert (batch.arch, batch.l0, batch.k) == ("jumprelu", 24, None)


@pytest.mark.parametrize(
    "cfg, raw, message",
    [
        ({"d_in": 64}, None, "'d_sae' is missing"),
        ({"d_sae": 64}, None, "'d_in' is missing"),
        ({"d_in": "64", "d_sae": 128}, None, "'d_in' must be a positive integer"),
        ({"d_in": 64, "d_sae": "__import__('os').getcwd()"}, None, "'d_sae' must be a positive integer"),
        ({"d_in": 64, "d_sae": True}, None, "'d_sae' must be a positive integer"),
        ({"d_in": 64, "d_sae": -3}, None, "'d_sae' must be a positive integer"),
        ({"d_in": 64, "d_sae": 12.5}, None, "'d_sae' must be a positive integer"),
        ({"d_in": 64, "d_sae": 128, "architecture": "crosscoder"}, None, "'architecture' must be one of"),
        ({"d_in": 64, "d_sae": 128, "architecture": 3}, None, "'architecture' must be one of"),
        ({"d_in": 64, "d_sae": 128, "architecture": "topk"}, None, "'k' is missing"),
        ({"d_in": 64, "d_sae": 128, "architecture": "topk", "k": 129}, None, "exceeds d_sae"),
        (
            {"d_in": 64, "d_sae": 128, "architecture": "topk", "activation_fn_kwargs": {"k": 0}},
            None,
            "'activation_fn_kwargs.k'",
        ),
        (
            {"d_in": 64, "d_sae": 128, "architecture": "topk", "activation_fn_kwargs": [50]},
            None,
            "'activation_fn_kwargs' must be an object",
        ),
        ({"d_in": 64, "d_sae": 128, "activation_fn_str": 1}, None, "'activation_fn_str' must be a string"),
        ({"d_in": 64, "d_sae": 128, "l0": "many"}, None, "'l0' must be a positive number"),
        ([64, 128], None, "top level must be a JSON object"),
        (None, "{not json", "not valid JSON"),
        (None, '{"d_in": 64, "d_sae": NaN}', "not valid JSON"),
    ],
)
def test_saelens_dir_errors_name_file_and_field(tmp_path, cfg, raw, message):
    path = _sae_dir(tmp_path, cfg, raw=raw)
    with pytest.raises(SpecError, match=message) as info:
        spec_from_saelens_dir(path)
    assert "cfg.json" in str(info.value)


def test_saelens_dir_missing_folder_or_config(tmp_path):
    with pytest.raises(SpecError, match="not a directory"):
        spec_from_saelens_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="cfg.json: missing"):
        spec_from_saelens_dir(tmp_path / "empty")
    big = _sae_dir(tmp_path, None, "big", raw=" " * (2 << 20))
    with pytest.raises(SpecError, match="too large"):
        spec_from_saelens_dir(big)


def test_saelens_dir_says_where_its_l0_came_from(tmp_path):
    cfg = {"d_in": 512, "d_sae": 16384, "architecture": "jumprelu"}
    spec, origin = read_saelens_dir(_sae_dir(tmp_path, cfg, "plain"))
    assert origin.assumed and "0.2% of d_sae" in origin.source and spec.l0 == 33
    spec, origin = read_saelens_dir(_sae_dir(tmp_path, cfg, "average_l0_61"))
    assert origin.assumed and "average_l0_61" in origin.source and spec.l0 == 61
    _, origin = read_saelens_dir(_sae_dir(tmp_path, {**cfg, "l0": 40}, "stated"))
    assert not origin.assumed and "'l0'" in origin.source
    _, origin = read_saelens_dir(tmp_path / "plain", l0=12)
    assert origin == L0Origin("given", assumed=False)
    topk = {"d_in": 64, "d_sae": 1024, "architecture": "topk", "k": 16}
    spec, origin = read_saelens_dir(_sae_dir(tmp_path, topk, "topk"))
    assert (spec.l0, origin.assumed) == (16, False)
    with pytest.raises(SpecError, match="its L0 is k"):
        read_saelens_dir(tmp_path / "topk", l0=20)


def test_saelens_gated_dir_is_tuned_like_a_relu_sae(tmp_path):
    """Gated SAEs open a varying number of gates per token and decode with feature_acts @ W_dec + b_dec."""
    cfg = {"d_in": 2304, "d_sae": 16384, "architecture": "gated", "l0": 80.0}
    spec, origin = read_saelens_dir(_sae_dir(tmp_path, cfg))
    assert (spec.arch, spec.l0, spec.k, origin.assumed) == ("relu", 80, None, False)
