import ast
import dataclasses
import shutil
import subprocess
import sys

import pytest

from sae_tune.targets.triton import render as render_mod
from sae_tune.targets.triton.render import load_module, module_digest, module_path, render, template_hash
from sae_tune.targets.triton.variant import Variant

VARIANTS = [
    Variant(),
    Variant(block_f=256, chunk_slots=4, unit_chunks=1, block_l=4, block_d=64),
    Variant(alloc="exact"),
    Variant(alloc="exact", block_l=1, block_d=64),
    Variant(alloc="fixed", overflow="validate", block_l=16, block_d=128),
    Variant(alloc="fixed", overflow="fallback", block_l=1),
    Variant(alloc="fixed", overflow="fallback", block_l=4, block_d=2048),
    Variant(alloc="fixed", overflow="unchecked", block_f=8192),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_rendered_module_is_valid_python_with_the_kernels_of_its_pipeline(variant):
    source = render(variant)
    tree = ast.parse(source)
    kernels = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    pipeline = {
        "chunked": {"fill_chunks_kernel", "decode_kernel", "reduce_kernel", "offset"},
        "exact": {"count_kernel", "fill_kernel", "decode_kernel"},
        "fixed": {"fill_fixed_kernel", "decode_kernel"},
    }
    assert kernels == pipeline[variant.alloc] | {"to_output"}
    assert f"BLOCK_D = tl.constexpr({variant.block_d})" in source
    assert f"BLOCK_L = tl.constexpr({variant.block_l})" in source
    assert ("FALLBACK_ROWS" in source) == (variant.overflow == "fallback" and variant.alloc == "fixed")
    assert ("for i in range(start, end):" in source) == (variant.block_l == 1)
    assert ast.get_docstring(tree).startswith("sae-tune generated kernels")


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is part of the test extra")
@pytest.mark.parametrize("variant", VARIANTS[:6], ids=lambda v: v.name)
def test_rendered_module_is_lint_clean(variant, tmp_path):
    path = tmp_path / "kernel.py"
    path.write_text(render(variant))
    cmd = ["ruff", "check", "--no-cache", "--select", "E,F,W", "--line-length", "120", str(path)]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0


def test_rendering_is_deterministic_and_content_addressed():
    a = Variant(alloc="fixed", overflow="fallback", max_l0=16)
    b = Variant(alloc="fixed", overflow="fallback", max_l0=512, num_warps=8)
    c = Variant(alloc="fixed", overflow="validate", max_l0=16)
    d = Variant(chunk_slots=16)
    assert render(a) == render(a)
    assert module_digest(d) != module_digest(Variant()), "chunk_slots is part of the source"
    # max_l0 and launch options are runtime values: one file serves them all
    assert module_digest(a) == module_digest(b)
    assert module_digest(a) != module_digest(c)
    assert len(template_hash()) == 64


def test_module_is_written_once_and_imported_once():
    v = Variant(block_d=32, block_l=2)
    first = load_module(v)
    path = module_path(v)
    mtime = path.stat().st_mtime_ns
    assert load_module(v) is first
    assert path.stat().st_mtime_ns == mtime
    assert path.read_text() == render(v)
    assert hasattr(first, "decode_kernel")


def test_tampered_variant_never_reaches_the_template():
    v = Variant()
    object.__setattr__(v, "block_d", "256)\nimport os\n#")
    with pytest.raises((TypeError, ValueError), match="block_d"):
        render(v)
    with pytest.raises(TypeError):
        render({"alloc": "exact"})  # type: ignore[arg-type]


def test_template_uses_strict_undefined():
    assert render_mod._env.undefined.__name__ == "StrictUndefined"
    with pytest.raises(Exception, match="undefined"):
        render_mod._env.get_template(render_mod.ENTRY_TEMPLATE).render(**dataclasses.asdict(Variant()))


def test_generated_file_imports_in_a_fresh_process(tmp_path):
    """A person (or Triton's cache) can import the file on its own, with no sae_tune state."""
    v = Variant(alloc="fixed", overflow="fallback")
    path = tmp_path / "kernel.py"
    path.write_text(render(v))
    code = (
        f"import importlib.util as u; s=u.spec_from_file_location('k', {str(path)!r}); "
        "m=u.module_from_spec(s); s.loader.exec_module(m); print(m.BLOCK_D, m.decode_kernel)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("constexpr[256]")


def test_atomics_are_relaxed_and_builds_use_a_1d_grid():
    """acq_rel (Triton's default) would put a GPU-wide fence in every program of the fixed build."""
    for v in VARIANTS:
        source = render(v)
        for line in source.splitlines():
            if "tl.atomic_" in line:
                assert 'sem="relaxed"' in line, line
        assert "tl.num_programs(1)" not in source
    assert "tl.atomic_add" in render(Variant(alloc="fixed"))
    assert "tl.atomic" not in render(Variant()) and "tl.atomic" not in render(Variant(alloc="exact"))


def test_decode_loops_accumulate_in_2d_and_reduce_after_the_loop():
    """No tl.sum inside the gather loop: a cross-warp reduction there costs barriers every step."""
    for v in (Variant(), Variant(alloc="exact"), Variant(alloc="fixed", overflow="unchecked")):
        source = render(v)
        decode = source[source.index("def decode_kernel") :]
        loop = decode[decode.index("    for ") : decode.index("    acc = tl.sum(acc2, axis=0)")]
        gather = loop if v.alloc != "fixed" else loop
        assert "acc2 +=" in gather and "tl.sum" not in gather.split("# an over-full chunk")[0]
