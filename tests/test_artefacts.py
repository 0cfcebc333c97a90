"""Only code sae-tune rendered runs: a private kernel folder, content checked before import, import from
the checked text (never a second read of the file)."""

import builtins
import inspect
import linecache
import os
import stat
import sys

import pytest

from sae_tune.artefacts import (
    ArtefactReplaced,
    UnsafeArtefactDir,
    private_dir,
    read_if_matches,
    sha256_hex,
    write_atomic,
)
from sae_tune.targets.triton import render as render_mod
from sae_tune.targets.triton.render import load_module, module_path, render, write_module
from sae_tune.targets.triton.variant import Variant

VARIANT = Variant(alloc="fixed", overflow="fallback", block_l=2, block_d=64)
PLANTED = (
    "import builtins\n"
    "builtins.SAE_TUNE_PLANTED = True\n"
    "raise SystemExit('planted file ran')\n"
    "def decode_kernel():\n    pass\n"
)


@pytest.fixture
def kernel_dir(tmp_path, monkeypatch):
    """A fresh (absent) kernel folder and an empty import cache, so load_module goes to disk again."""
    folder = tmp_path / "cache" / "kernels"
    monkeypatch.setenv("SAE_TUNE_KERNEL_DIR", str(folder))
    monkeypatch.setattr(render_mod, "_loaded", {})
    for name in [n for n in sys.modules if n.startswith("sae_tune_kernel_")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    yield folder
    assert not builtins.__dict__.pop("SAE_TUNE_PLANTED", False), "a planted kernel file was executed"


def _plant(path, text: str = PLANTED) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(text)


def test_kernel_folder_is_created_private(kernel_dir):
    old = os.umask(0o002)  # a permissive umask must not make the folder group-writable
    try:
        load_module(VARIANT)
    finally:
        os.umask(old)
    assert stat.S_IMODE(kernel_dir.stat().st_mode) == 0o700


def test_planted_file_under_the_kernel_name_is_not_run_and_is_rewritten(kernel_dir):
    path = module_path(VARIANT)
    _plant(path)
    with pytest.warns(ArtefactReplaced, match=str(path)):
        module = load_module(VARIANT)
    assert hasattr(module, "decode_kernel") and module.__file__ == str(path)
    assert path.read_text() == render(VARIANT)


def test_edited_file_is_rewritten_by_write_module(kernel_dir):
    path = module_path(VARIANT)
    _plant(path, render(VARIANT).replace("BLOCK_D = tl.constexpr(64)", "BLOCK_D = tl.constexpr(65)"))
    with pytest.warns(ArtefactReplaced, match="edited or planted"):
        assert write_module(VARIANT) == path
    assert path.read_text() == render(VARIANT)


def test_symlink_under_the_kernel_name_is_replaced_not_followed(kernel_dir, tmp_path):
    target = tmp_path / "elsewhere.py"
    target.write_text(render(VARIANT))  # right content, but reached through a link: not ours
    path = module_path(VARIANT)
    path.parent.mkdir(mode=0o700, parents=True)
    path.symlink_to(target)
    with pytest.warns(ArtefactReplaced):
        write_module(VARIANT)
    assert not path.is_symlink() and path.read_text() == render(VARIANT)
    assert target.read_text() == render(VARIANT)


def test_file_swapped_after_the_check_is_not_what_runs(kernel_dir, monkeypatch):
    """The module is executed from the checked text, not by opening the path again."""
    path = write_module(VARIANT)  # the right file is in place
    checked = render_mod.read_if_matches

    def check_then_swap(path, expected):
        data = checked(path, expected)
        _plant(path)  # another writer replaces the file right after the check
        return data

    monkeypatch.setattr(render_mod, "read_if_matches", check_then_swap)
    module = load_module(VARIANT)
    assert hasattr(module, "decode_kernel")
    assert path.read_text() == PLANTED  # the swap happened; its content did not run


def test_triton_reads_the_checked_source_even_if_the_file_changes_later(kernel_dir):
    module = load_module(VARIANT)
    path = module_path(VARIANT)
    path.write_text("# changed after import\n" * 3)
    linecache.checkcache(str(path))
    source = inspect.getsource(module.decode_kernel.fn)
    assert source in render(VARIANT) and "def decode_kernel(" in source


def test_group_or_world_writable_kernel_folder_is_refused(kernel_dir):
    kernel_dir.mkdir(parents=True)
    for mode in (0o770, 0o1777):
        kernel_dir.chmod(mode)
        with pytest.raises(UnsafeArtefactDir, match="SAE_TUNE_KERNEL_DIR") as info:
            load_module(VARIANT)
        assert str(kernel_dir) in str(info.value) and "writable by group or others" in str(info.value)
        with pytest.raises(UnsafeArtefactDir):
            write_module(VARIANT)
    assert not any(kernel_dir.iterdir())  # nothing was written into it either
    kernel_dir.chmod(0o755)  # not writable by others: accepted
    assert hasattr(load_module(VARIANT), "decode_kernel")


def test_kernel_folder_that_is_a_file_is_refused(kernel_dir):
    kernel_dir.parent.mkdir(parents=True)
    kernel_dir.write_text("")
    with pytest.raises(UnsafeArtefactDir, match="not a directory.*SAE_TUNE_KERNEL_DIR"):
        load_module(VARIANT)


def test_rendering_happens_once_per_module_and_process(kernel_dir, monkeypatch):
    calls = []
    real = render_mod._render_params
    monkeypatch.setattr(render_mod, "_rendered", {})
    monkeypatch.setattr(render_mod, "_render_params", lambda params: calls.append(params) or real(params))
    render(VARIANT)
    write_module(VARIANT)
    load_module(Variant(alloc="fixed", overflow="fallback", block_l=2, block_d=64, max_l0=7, num_warps=2))
    assert len(calls) == 1


def test_read_if_matches_checks_the_bytes_it_returns(tmp_path):
    path = tmp_path / "a.bin"
    write_atomic(path, b"kernel")
    assert read_if_matches(path, sha256_hex(b"kernel")) == b"kernel"
    assert read_if_matches(path, sha256_hex(b"other")) is None
    assert read_if_matches(tmp_path / "absent", sha256_hex(b"")) is None
    link = tmp_path / "link"
    link.symlink_to(path)
    assert read_if_matches(link, sha256_hex(b"kernel")) is None
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert read_if_matches(fifo, sha256_hex(b"")) is None  # returns at once, never blocks on a pipe
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_private_dir_without_env_var_suggests_another_folder(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o700)
    folder.chmod(0o722)
    with pytest.raises(UnsafeArtefactDir, match="chmod go-w .* or choose another folder"):
        private_dir(folder)
    created = private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(created.stat().st_mode) == 0o700
