import builtins
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from sae_tune import Variant, sparse_decode, triton_available
from sae_tune.targets.triton.support import interpreter_active, triton_installed, triton_unavailable_reason


def test_interpreter_makes_cpu_tensors_runnable():
    assert interpreter_active() and triton_installed()
    assert triton_available("cpu")
    assert triton_unavailable_reason("cpu") is None


def test_without_interpreter_cpu_is_refused_with_a_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = triton_unavailable_reason("cpu")
    assert reason is not None and "CUDA" in reason
    with pytest.raises(RuntimeError, match="CUDA"):
        sparse_decode(torch.zeros(2, 256), torch.zeros(256, 8), variant=Variant())


def test_without_triton_nothing_crashes_and_kernels_report_it(monkeypatch):
    import sae_tune.targets.triton.support as ts

    monkeypatch.setattr(ts, "triton_installed", lambda: False)
    assert not triton_available("cuda")
    assert "not installed" in triton_unavailable_reason("cuda")
    assert 'pip install "sae-tune[triton]"' in triton_unavailable_reason("cuda")


def _reason_when_importing_triton_raises(error: ImportError | None) -> str | None:
    """The reason for a CUDA device when ``import triton`` fails with ``error`` (None: not installed)."""
    import sae_tune.targets.triton.support as ts

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise error
        return real_import(name, *args, **kwargs)

    ts.triton_import_error.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as m:
            if error is None:
                m.setitem(sys.modules, "triton", None)  # what Python does for a missing module
            else:
                m.setattr(builtins, "__import__", fake_import)
            return triton_unavailable_reason("cuda")
    finally:
        ts.triton_import_error.cache_clear()  # the real triton again for the tests that follow


def test_missing_triton_names_the_extra_and_cuda_torch():
    reason = _reason_when_importing_triton_raises(None)
    assert reason is not None and reason.startswith("triton is not installed")
    assert 'pip install "sae-tune[triton]"' in reason and "CUDA build of torch" in reason
    assert triton_installed()  # restored


def test_broken_triton_is_not_reported_as_missing():
    reason = _reason_when_importing_triton_raises(ImportError("libcuda.so.1: cannot open shared object"))
    assert reason is not None and "installed but cannot be imported" in reason
    assert "libcuda.so.1" in reason and "sae-tune[triton]" in reason


def test_default_install_leaves_triton_out_and_the_extras_bring_it():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    project = tomllib.loads(pyproject.read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {Requirement(r).name for r in requirements}

    extras = project["optional-dependencies"]
    assert "triton" not in names(project["dependencies"])
    assert "triton" in names(extras["triton"])
    assert "triton" in names(extras["test"])  # CI installs the test extra: kernels are tested


def test_import_without_triton_in_a_fresh_process(tmp_path):
    """``import sae_tune`` must work where triton cannot be imported at all."""
    import subprocess
    import sys

    blocker = tmp_path / "triton"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('triton is blocked for this test')\n")
    code = "import sys; import sae_tune; print(sae_tune.triton_available('cuda'), 'triton' in sys.modules)"
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
    code = "import sae_tune.targets.triton.support as ts; print(ts.triton_unavailable_reason('cuda'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "cannot be imported" in done.stdout and "triton is blocked for this test" in done.stdout
