import pytest
import torch

from sae_tune import Variant, sparse_decode, triton_available
from sae_tune.triton_support import interpreter_active, triton_installed, triton_unavailable_reason


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
    import sae_tune.triton_support as ts

    monkeypatch.setattr(ts, "triton_installed", lambda: False)
    assert not triton_available("cuda")
    assert "not installed" in triton_unavailable_reason("cuda")


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
