"""SAE shapes: published presets, explicit shapes, and local SAELens directories.

The tuner only needs the numbers that decide the cost of ``feature_acts @ W_dec + b_dec``: the width F
(rows of W_dec), d_model D (columns), the mean number of fired features per token (L0) and whether the
architecture fixes it (TopK: exactly k per token). A preset also names where the SAE comes from
(SAELens ``release`` / ``sae_id``) so a user can check that the shape tuned is the shape they load; the
tuner itself never downloads anything.

Sources of the preset numbers: widths and d_model from the Gemma Scope, Llama Scope and Qwen-Scope
releases; L0 from the ``average_l0_N`` folder names of the Gemma Scope releases (the N is the SAE's mean
L0 on its training distribution), Llama Scope's training K, and Qwen-Scope's Top-K. Where a release id
could not be confirmed, ``release`` and ``sae_id`` are None rather than guessed.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHS = ("jumprelu", "topk", "relu")

# L0 assumed for a local SAE whose config says nothing about sparsity: 0.2% of the width (Gemma Scope's
# widely used SAEs sit between 0.1% and 0.5%), at least 1.
DEFAULT_L0_FRACTION = 0.002

# cfg.json files are small; anything far larger is not an SAELens config.
_MAX_CFG_BYTES = 1 << 20

# SAELens ``architecture`` values and the decode-side behaviour they imply. Gated and standard SAEs
# decode like a ReLU SAE (a gated SAE fires the features whose gate is open, a number that varies per
# token like a ReLU SAE's L0, and decodes with ``feature_acts @ W_dec + b_dec``); BatchTopK SAEs run
# with a learned threshold at inference (JumpReLU-like), so their per-token L0 varies around k.
_SAELENS_ARCHS = {
    "jumprelu": "jumprelu",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "matryoshka_batchtopk": "jumprelu",
    "standard": "relu",
    "relu": "relu",
    "gated": "relu",
}

_AVERAGE_L0_DIR = re.compile(r"average_l0_(\d+)$")


class SpecError(ValueError):
    """An SAE shape, preset name or config that cannot be used; the message names the field."""


def _check_int(field: str, value: Any, *, lo: int = 1, hi: int | None = None) -> int:
    if type(value) is not int:
        raise SpecError(f"SAESpec.{field} must be an int, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise SpecError(f"SAESpec.{field} must be {bound}, got {value}")
    return value


@dataclass(frozen=True)
class SAESpec:
    """The decode-relevant shape of one SAE.

    name     registry or user-chosen identifier (also used in cache keys and tables).
    width    F, number of features (rows of W_dec).
    d_model  D, model dimension (columns of W_dec).
    l0       mean non-zero features per token; equals k for TopK.
    arch     "jumprelu" | "topk" | "relu": how per-token L0 is distributed.
    release / sae_id  SAELens identifiers, or None when not confirmed.
    k        TopK only: features kept per token.
    """

    name: str
    width: int
    d_model: int
    l0: int
    arch: str = "jumprelu"
    release: str | None = None
    sae_id: str | None = None
    k: int | None = None

    def __post_init__(self) -> None:
        if type(self.name) is not str or not self.name.strip():
            raise SpecError(f"SAESpec.name must be a non-empty string, got {self.name!r}")
        _check_int("width", self.width)
        _check_int("d_model", self.d_model)
        _check_int("l0", self.l0, hi=self.width)
        if type(self.arch) is not str or self.arch not in ARCHS:
            raise SpecError(f"SAESpec.arch must be one of {list(ARCHS)}, got {self.arch!r}")
        for field in ("release", "sae_id"):
            value = getattr(self, field)
            if value is not None and (type(value) is not str or not value):
                raise SpecError(f"SAESpec.{field} must be a non-empty string or None, got {value!r}")
        if self.sae_id is not None and self.release is None:
            raise SpecError("SAESpec.sae_id is set but release is None; an sae_id belongs to a release")
        if self.arch == "topk":
            if self.k is None:
                raise SpecError("SAESpec.k is required for arch='topk'")
            _check_int("k", self.k, hi=self.width)
            if self.l0 != self.k:
                raise SpecError(f"SAESpec.l0 must equal k for arch='topk', got l0={self.l0}, k={self.k}")
        elif self.k is not None:
            raise SpecError(f"SAESpec.k applies to arch='topk' only, got k={self.k!r} for arch={self.arch!r}")

    @property
    def density(self) -> float:
        """Fraction of W_dec rows a token touches on average (L0 / F)."""
        return self.l0 / self.width


_GEMMA_D_MODEL = {"2b": 2304, "9b": 3584, "27b": 4608}


def _gemma(name: str, size: str, sae_id: str, width: int, l0: int, *, canonical: bool = False) -> SAESpec:
    """A Gemma Scope residual-stream SAE of Gemma 2 ``size`` ("2b", "9b", "27b")."""
    release = f"gemma-scope-{size}-pt-res" + ("-canonical" if canonical else "")
    return SAESpec(name, width, _GEMMA_D_MODEL[size], l0, "jumprelu", release, sae_id)


_PRESET_LIST: tuple[SAESpec, ...] = (
    # Gemma Scope, Gemma 2 2B. Every layer has 16k and 65k; 262k exists at layer 12 only.
    # "gemma-2b-l20" is the reference shape of the design's measurements (B=32, L0 ~72): the canonical
    # layer-20 65k SAE. The exact published operating points of that site are listed after it.
    _gemma("gemma-2b-l20", "2b", "layer_20/width_65k/canonical", 65536, 72, canonical=True),
    _gemma("gemma-2b-l20-65k-l0-61", "2b", "layer_20/width_65k/average_l0_61", 65536, 61),
    _gemma("gemma-2b-l20-65k-l0-114", "2b", "layer_20/width_65k/average_l0_114", 65536, 114),
    _gemma("gemma-2b-l20-16k", "2b", "layer_20/width_16k/average_l0_71", 16384, 71),
    _gemma("gemma-2b-l12-16k", "2b", "layer_12/width_16k/average_l0_82", 16384, 82),
    _gemma("gemma-2b-l12-65k", "2b", "layer_12/width_65k/average_l0_72", 65536, 72),
    _gemma("gemma-2b-l12-262k", "2b", "layer_12/width_262k/average_l0_121", 262144, 121),
    # Gemma Scope, Gemma 2 9B, layer 20 (16k and 131k exist at every layer).
    _gemma("gemma-9b-l20-16k", "9b", "layer_20/width_16k/average_l0_68", 16384, 68),
    _gemma("gemma-9b-l20-131k", "9b", "layer_20/width_131k/average_l0_114", 131072, 114),
    # Gemma Scope, Gemma 2 27B: 131k at layers 10, 22 and 34.
    _gemma("gemma-27b-l22-131k", "27b", "layer_22/width_131k/average_l0_82", 131072, 82),
    # Llama Scope, Llama-3.1-8B residual stream (8x and 32x expansions), layer 15. Trained as TopK with
    # K=50 and released as JumpReLU, so per-token L0 varies around ~50.
    SAESpec("llama-8b-l15-8x", 32768, 4096, 50, "jumprelu", "llama_scope_lxr_8x", "l15r_8x"),
    SAESpec("llama-8b-l15-32x", 131072, 4096, 50, "jumprelu", "llama_scope_lxr_32x", "l15r_32x"),
    # Qwen-Scope residual-stream TopK SAEs (16x expansion). Published as plain .pt files, not SAELens
    # releases, so no release id. Note: their checkpoints store W_dec as (d_model, d_sae).
    SAESpec("qwen3.5-2b-topk50", 32768, 2048, 50, "topk", k=50),
    SAESpec("qwen3.5-27b-topk100", 81920, 5120, 100, "topk", k=100),
)

PRESETS: dict[str, SAESpec] = {spec.name: spec for spec in _PRESET_LIST}
if len(PRESETS) != len(_PRESET_LIST):  # pragma: no cover - guards edits of the table above
    raise RuntimeError("duplicate preset names in sae_tune.specs")


def list_specs() -> tuple[SAESpec, ...]:
    """All presets, in table order (grouped by model family)."""
    return _PRESET_LIST


def get_spec(name: str) -> SAESpec:
    """The preset called ``name`` (case-insensitive); an unknown name lists the closest known ones."""
    if type(name) is not str:
        raise SpecError(f"preset name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    close = difflib.get_close_matches(key, list(PRESETS), n=5, cutoff=0.5)
    hint = f"did you mean: {', '.join(close)}?" if close else f"known presets: {', '.join(PRESETS)}"
    raise SpecError(f"unknown SAE preset {name!r}; {hint}")


def spec_from_shape(
    width: int,
    d_model: int,
    l0: int,
    arch: str = "jumprelu",
    k: int | None = None,
    *,
    name: str | None = None,
) -> SAESpec:
    """A spec for an SAE that is not a preset. For TopK, ``k`` defaults to ``l0``."""
    if arch == "topk" and k is None:
        k = l0
    if name is None:
        name = f"custom-f{width}-d{d_model}-l0-{l0}" + (f"-{arch}" if arch != "jumprelu" else "")
    return SAESpec(name, width, d_model, l0, arch, None, None, k)


# --- local SAELens directories --------------------------------------------------------------------------


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-finite number {token} is not allowed")


def _cfg_int(cfg: dict[str, Any], key: str, cfg_file: Path, *, label: str | None = None) -> int | None:
    """A positive integer field (an integral float such as 16384.0 is accepted), None when absent."""
    label = label or key
    value = cfg.get(key)
    if value is None:
        return None
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int or value < 1:
        raise SpecError(f"{cfg_file}: field {label!r} must be a positive integer, got {value!r}")
    return value


def _cfg_required_int(cfg: dict[str, Any], key: str, cfg_file: Path) -> int:
    value = _cfg_int(cfg, key, cfg_file)
    if value is None:
        raise SpecError(f"{cfg_file}: required field {key!r} is missing")
    return value


def _read_cfg(path: Path) -> dict[str, Any]:
    cfg_path = path / "cfg.json"
    if not path.is_dir():
        raise SpecError(f"{path}: not a directory (expected a local SAELens SAE folder with cfg.json)")
    if not cfg_path.is_file():
        raise SpecError(f"{cfg_path}: missing; a local SAELens SAE folder holds cfg.json")
    size = cfg_path.stat().st_size
    if size > _MAX_CFG_BYTES:
        raise SpecError(f"{cfg_path}: {size} bytes is too large for an SAE config")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError(f"{cfg_path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise SpecError(f"{cfg_path}: top level must be a JSON object, got {type(cfg).__name__}")
    return cfg


@dataclass(frozen=True)
class L0Origin:
    """Where the L0 of a local SAE came from. ``assumed`` is True when its cfg.json does not state it
    (taken from the folder name or the default fraction), so that a caller can say so instead of tuning
    a guessed shape silently."""

    source: str
    assumed: bool


def _default_l0(
    cfg: dict[str, Any], cfg_file: Path, path: Path, width: int, k: int | None
) -> tuple[int, L0Origin]:
    """L0 of a local SAE when the caller gave none; derived values are clipped to the width."""
    if k is not None:  # TopK, and BatchTopK whose mean L0 is k by construction
        return k, L0Origin("k in cfg.json", assumed=False)
    if cfg.get("l0") is not None:
        raw = cfg["l0"]
        if type(raw) not in (int, float) or not math.isfinite(raw) or raw <= 0:
            raise SpecError(f"{cfg_file}: field 'l0' must be a positive number, got {raw!r}")
        return min(width, max(1, round(raw))), L0Origin("field 'l0' of cfg.json", assumed=False)
    match = _AVERAGE_L0_DIR.search(path.resolve().name)
    if match:
        origin = L0Origin(f"the folder name {match.group(0)!r} (cfg.json states no L0)", assumed=True)
        return min(width, max(1, int(match.group(1)))), origin
    share = f"{DEFAULT_L0_FRACTION:.1%}"
    origin = L0Origin(f"{share} of d_sae (cfg.json states no L0)", assumed=True)
    return min(width, max(1, round(width * DEFAULT_L0_FRACTION))), origin


def spec_from_saelens_dir(path: str | Path, *, l0: int | None = None, name: str | None = None) -> SAESpec:
    """Read the shape of a local SAELens SAE folder from its ``cfg.json`` (JSON only; nothing is run).

    Uses ``d_sae`` (width), ``d_in`` (d_model) and ``architecture`` (default "standard"); TopK takes ``k``
    from the top level or from ``activation_fn_kwargs``. L0, in order: the ``l0`` argument; k for TopK;
    a numeric ``l0`` field of the config if it has one; the N of a Gemma Scope folder named
    ``average_l0_N``; else ``DEFAULT_L0_FRACTION`` of the width. ``read_saelens_dir`` also says which.
    """
    return read_saelens_dir(path, l0=l0, name=name)[0]


def read_saelens_dir(
    path: str | Path, *, l0: int | None = None, name: str | None = None
) -> tuple[SAESpec, L0Origin]:
    """``spec_from_saelens_dir`` plus where its L0 came from (see ``L0Origin``)."""
    path = Path(path)
    cfg_file = path / "cfg.json"
    cfg = _read_cfg(path)
    width = _cfg_required_int(cfg, "d_sae", cfg_file)
    d_model = _cfg_required_int(cfg, "d_in", cfg_file)
    raw_arch = cfg.get("architecture", "standard")
    if type(raw_arch) is not str or raw_arch.lower() not in _SAELENS_ARCHS:
        raise SpecError(
            f"{cfg_file}: field 'architecture' must be one of {sorted(_SAELENS_ARCHS)}, got {raw_arch!r}"
        )
    arch = _SAELENS_ARCHS[raw_arch.lower()]
    # Older SAELens configs describe TopK as a "standard" SAE with activation_fn_str "topk".
    act_fn = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    if act_fn is not None and type(act_fn) is not str:
        raise SpecError(f"{cfg_file}: field 'activation_fn_str' must be a string, got {act_fn!r}")
    if arch == "relu" and act_fn is not None and act_fn.lower() == "topk":
        arch = "topk"

    k: int | None = None
    if arch == "topk" or raw_arch.lower() in ("batchtopk", "matryoshka_batchtopk"):
        k = _cfg_int(cfg, "k", cfg_file)
        kwargs = cfg.get("activation_fn_kwargs")
        if k is None and kwargs is not None:
            if not isinstance(kwargs, dict):
                raise SpecError(f"{cfg_file}: field 'activation_fn_kwargs' must be an object, got {kwargs!r}")
            k = _cfg_int(kwargs, "k", cfg_file, label="activation_fn_kwargs.k")
        if k is not None and k > width:
            raise SpecError(f"{cfg_file}: field 'k' ({k}) exceeds d_sae ({width})")
        if k is None and arch == "topk":
            raise SpecError(f"{cfg_file}: field 'k' is missing (needed for a TopK SAE)")

    if l0 is None:
        l0, origin = _default_l0(cfg, cfg_file, path, width, k)
    else:
        origin = L0Origin("given", assumed=False)
    if arch != "topk":
        k = None
    elif l0 != k:
        raise SpecError(
            f"{cfg_file}: a TopK SAE fires exactly k={k} features per token; its L0 is k, not {l0}"
        )
    if name is None:
        name = f"saelens:{path.resolve().name}"
    return SAESpec(name, width, d_model, l0, arch, None, None, k), origin
