"""``sae-tune selftest`` runs on CPU (the interpreter), prints one verdict, and fails when a kernel is
wrong."""

import subprocess
import sys

import torch
from click.testing import CliRunner

from sae_tune.cli import selftest as selftest_mod
from sae_tune.cli.main import main


def test_selftest_runs_on_cpu_and_passes():
    result = CliRunner().invoke(main, ["selftest", "--device", "cpu", "--tune-seconds", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("selftest on cpu") and lines[-1] == "verdict: PASS"
    assert any(line.startswith("bench summary") for line in lines)
    assert any(line.split()[:1] == ["dense"] and line.endswith("ok") for line in lines)
    total = len(list(selftest_mod.cases(full=False)))
    assert f"correctness: {total} of {total} cases" in result.output
    assert "tune: " in result.output and "not a measurement of speed" in result.output
    encodes = len(selftest_mod.encode_cases(torch.device("cpu")))
    assert f"encode: {encodes} of {encodes} cases (cpu, library, triton;" in result.output


def test_selftest_fails_with_a_verdict_when_a_case_is_wrong(monkeypatch):
    real, real_cases = selftest_mod.run_case, selftest_mod.cases
    monkeypatch.setattr(
        selftest_mod,
        "run_case",
        lambda case, dev: "wrong" if case.variant.alloc == "exact" else real(case, dev),
    )
    monkeypatch.setattr(selftest_mod, "cases", lambda full: list(real_cases(full))[:9])
    result = CliRunner().invoke(main, ["selftest", "--device", "cpu", "--no-tune"])
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and result.output.strip().endswith("problem(s))")


def test_selftest_refuses_cpu_when_triton_was_imported_without_the_interpreter():
    code = (
        "import os, sys; os.environ.pop('TRITON_INTERPRET', None); import triton; "
        "from sae_tune.cli.main import main; sys.argv = ['sae-tune', 'selftest', '--device', 'cpu']; main()"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "TRITON_INTERPRET=1" in done.stderr, done.stderr[-1000:]


def test_selftest_encode_check_fails_when_an_encode_drops_a_feature(monkeypatch):
    """The Triton encode (run in the interpreter) made to lose each token's last feature: the encode cases
    of that target fail and the verdict is FAIL; the other targets' cases still pass."""
    from sae_tune.targets.triton import TritonTarget

    real = TritonTarget.encode

    def dropping(self, impl, config, problem):
        offsets, indices, values = real(self, impl, config, problem)
        keep = torch.ones(len(indices), dtype=torch.bool)
        keep[offsets[1:][offsets[1:] > offsets[:-1]] - 1] = False
        counts = (offsets[1:] - offsets[:-1]) - (offsets[1:] > offsets[:-1]).long()
        new = offsets.clone()
        new[1:] = counts.cumsum(0)
        return new, indices[keep], values[keep]

    monkeypatch.setattr(TritonTarget, "encode", dropping)
    monkeypatch.setattr(selftest_mod, "cases", lambda full: [])
    result = CliRunner().invoke(main, ["selftest", "--device", "cpu", "--no-tune"])
    assert result.exit_code == 1, result.output
    failed = [line for line in result.output.splitlines() if line.strip().startswith("FAILED")]
    assert failed and all("enc-" in line and "different" in line for line in failed), failed
    cases = selftest_mod.encode_cases(torch.device("cpu"))
    triton = sum(c.target.name == "triton" for c in cases)
    assert triton and f"encode: {len(cases) - triton} of {len(cases)} cases" in result.output
