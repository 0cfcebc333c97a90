"""The README's examples run as written: every fenced ```python block is executed (each in a fresh
namespace, as a reader pastes it), and every shell line is either run here, run in the slow tier, or
listed below with the reason it is not run; a line added to the README without a decision fails."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from sae_tune.cli.main import main

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, text) of every fenced block of ``lang`` in the README."""
    text = README.read_text()
    return [
        (text[: m.start()].count("\n") + 1, m.group(2)) for m in _FENCE.finditer(text) if m.group(1) == lang
    ]


def shell_lines() -> list[str]:
    """Every command of the README's ```bash blocks, its trailing comment removed (comment-only lines,
    the continuation of a comment, are not commands)."""
    lines = []
    for _, block in blocks("bash"):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


# Shell lines run in the default tier: quick, and nothing outside this machine.
QUICK = {
    "sae-tune show-kernel --alloc fixed --overflow fallback --block-l 8",
    "sae-tune show-kernel --block-d 128 --path",
    "sae-tune list",
    "sae-tune cache show",
    "sae-tune cache import my-gpu.json",  # my-gpu.json: the local cache exported (export needs a GPU)
    "sae-tune cache clear",
}
# Shell lines run by the slow tier (test_slow_shell_lines_run): minutes each on a 2-core CPU machine.
SLOW = {
    "sae-tune compile-check --arch sm_80 --arch sm_89 --arch sm_90 --json",
    "sae-tune compile-check --op encode --arch sm_90 --dtype bfloat16",
    "sae-tune --sae gemma-2b-l20 --device cpu --batch-size 32 --trials 20",
    "sae-tune --sae gemma-2b-l20 --batch-size 1 --batch-size 256 --json",
    "sae-tune --sae path/to/saelens_dir",  # the folder is made here: a cfg.json of a small SAE
    "sae-tune --width 65536 --d-model 2304 --l0 72",
    "sae-tune --sae qwen3.5-2b-topk50 --acts acts.pt",  # acts.pt is made here: TopK-50 activations
    "sae-tune bench --quick --out bench/",
}
# Shell lines not run by the tests, and why. Lines starting with sae-tune are still parsed (options exist)
# unless their options need a GPU to parse.
NOT_RUN = {
    "pip install torch==2.13.0 && pip install -e . && sae-tune --sae gemma-2b-l20": (
        "installs from the package index; .ci/run installs the same way, and the tune it ends with is the "
        "gemma-2b-l20 tune of the slow tier"
    ),
    'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q': (
        "installs from the package index and runs this suite: .ci/run does exactly this"
    ),
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && pip install -e . && "
    "sae-tune --sae gemma-2b-l20": "installs from PyTorch's CPU wheel index, which CI does not reach",
    "python -m pytest -q -m slow": "is the slow tier itself (which runs the SLOW lines above)",
    "sae-tune bench --device cuda --out bench/": "needs a CUDA device",
    'sae-tune cache export --device "$(nvidia-smi --query-gpu=name --format=csv,noheader)" -o my-gpu.json': (
        "needs nvidia-smi (a GPU); the quick tier exports the local cache to my-gpu.json instead"
    ),
}
NEEDS_GPU_TO_PARSE = {"sae-tune bench --device cuda --out bench/"}


def test_every_shell_line_is_run_or_has_a_reason():
    lines = shell_lines()
    assert len(lines) == len(set(lines)), "a README shell line appears twice"
    decided = QUICK | SLOW | set(NOT_RUN)
    assert set(lines) == decided, {
        "in the README, not decided here": sorted(set(lines) - decided),
        "decided here, not in the README": sorted(decided - set(lines)),
    }


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A fresh working folder and cache for commands that read or write files named as written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAE_TUNE_CACHE", str(tmp_path / "cache.sqlite"))
    return tmp_path


@pytest.mark.parametrize("line", sorted(QUICK))
def test_quick_shell_lines_run(line, here):
    runner = CliRunner()
    if line == "sae-tune cache import my-gpu.json":
        made = runner.invoke(main, ["cache", "export", "-o", "my-gpu.json"])
        assert made.exit_code == 0 and (here / "my-gpu.json").is_file(), made.output
    result = runner.invoke(main, shlex.split(line)[1:], input="y\n")
    assert result.exit_code == 0, result.output
    assert result.output.strip()


@pytest.mark.parametrize("line,block", [pytest.param(*b, id=f"README.md:{b[0]}") for b in blocks("python")])
def test_python_blocks_run_as_written(line, block, here):
    """Each block runs alone in a fresh namespace (with this process's sae_tune and SAELens), as a
    reader pastes it into a new interpreter."""
    code = compile(block, f"README.md:{line}", "exec")
    torch.manual_seed(0)
    exec(code, {"__name__": "__readme__"})


def test_the_readme_has_python_examples_of_decode_and_of_sparse_encode_under_no_grad():
    text = "\n".join(block for _, block in blocks("python"))
    assert "sae_tune.sparse_decode(" in text and "sae_tune.sparse_encode(" in text
    assert "torch.no_grad()" in text


def _slow_setup(cwd: Path) -> None:
    """The files the slow lines name: a SAELens folder of a small JumpReLU SAE and TopK-50 activations of
    the qwen3.5-2b-topk50 shape."""
    folder = cwd / "path" / "to" / "saelens_dir"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text('{"d_in": 256, "d_sae": 4096, "architecture": "jumprelu", "l0": 32}')
    gen = torch.Generator().manual_seed(0)
    acts = torch.zeros(256, 32768)
    top = torch.rand(256, 32768, generator=gen).topk(50, dim=1).indices
    acts.scatter_(1, top, torch.rand(256, 50, generator=gen) + 0.1)
    torch.save(acts, cwd / "acts.pt")


@pytest.mark.slow
@pytest.mark.parametrize("line", sorted(SLOW))
def test_slow_shell_lines_run(line, tmp_path):
    _slow_setup(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile-check: real Triton
    env["SAE_TUNE_CACHE"] = str(tmp_path / "cache.sqlite")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _parse(line: str) -> click.Command:
    """Parse a sae-tune line as the command line would, down to its subcommand, without running it."""
    args = shlex.split(line)[1:]
    ctx = main.make_context("sae-tune", args)
    command: click.Command = main
    while isinstance(command, click.Group):
        protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
        rest = [*protected, *ctx.args]
        if not rest:
            break
        name, command, rest = command.resolve_command(ctx, rest)
        assert command is not None and name is not None
        ctx = command.make_context(name, rest, parent=ctx)
    return command


def test_every_sae_tune_line_parses(here):
    """The lines not run here (slow, or not run at all): their subcommands and options exist as written
    (beside the files the slow lines name)."""
    _slow_setup(here)
    parsed = [
        _parse(line)
        for line in shell_lines()
        if line.startswith("sae-tune ") and line not in QUICK | NEEDS_GPU_TO_PARSE
    ]
    assert {c.name for c in parsed} == {"main", "compile-check", "bench", "export"}
    with pytest.raises(click.UsageError):
        _parse("sae-tune compile-check --no-such-option")


def test_the_quickstart_holds_two_set_up_commands_and_says_how_to_get_the_cpu_build():
    """Two set-up commands (the main job, the tests); beside them the CPU-only variant of the first, since a
    bare ``torch==2.13.0`` from the public index is the CUDA build on Linux x86_64."""
    text = README.read_text()
    quick = text[text.index("## Quickstart") : text.index("## Using it")]
    first = blocks("bash")[0][1].strip().splitlines()
    assert first == [
        "pip install torch==2.13.0 && pip install -e . && sae-tune --sae gemma-2b-l20",
        'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q',
    ]
    cpu_only = [line for _, b in blocks("bash") for line in b.splitlines() if "--index-url" in line]
    assert cpu_only == [
        "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && pip install -e . "
        "&& sae-tune --sae gemma-2b-l20"
    ]
    assert cpu_only[0] in quick and "CUDA" in quick and "download" in quick
