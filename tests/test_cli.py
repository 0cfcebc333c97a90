import ast
import json

from click.testing import CliRunner

from sae_tune.cli.main import main
from sae_tune.targets.triton.render import render
from sae_tune.targets.triton.variant import Variant


def test_show_kernel_prints_the_generated_source():
    result = CliRunner().invoke(
        main,
        ["show-kernel", "--alloc", "fixed", "--overflow", "fallback", "--max-l0", "16", "--block-l", "8"],
    )
    assert result.exit_code == 0, result.output
    expected = render(Variant(alloc="fixed", overflow="fallback", max_l0=16, block_l=8))
    assert result.output == expected
    ast.parse(result.output)


def test_show_kernel_path_points_at_the_written_file():
    result = CliRunner().invoke(main, ["show-kernel", "--block-d", "128", "--path"])
    assert result.exit_code == 0
    with open(result.output.strip()) as handle:
        assert handle.read() == render(Variant(block_d=128))


def test_invalid_variant_options_are_usage_errors():
    runner = CliRunner()
    for args in (
        ["--block-d", "100"],
        ["--block-l", "abc"],
        ["--alloc", "exact", "--max-l0", "64"],
        ["--alloc", "dense"],
    ):
        result = runner.invoke(main, ["show-kernel", *args])
        assert result.exit_code == 2, (args, result.output)


def test_version_and_help():
    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).output.startswith("sae-tune, version")
    help_text = runner.invoke(main, ["--help"]).output
    assert "compile-check" in help_text and "show-kernel" in help_text


def test_show_kernel_prints_a_generated_c_variant_and_refuses_a_bad_config():
    runner = CliRunner()
    result = runner.invoke(main, ["show-kernel", "--target", "cpu", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert "#include" in result.output and "bf16" in result.output
    fused = '{"family": "fused", "prefetch": 0}'
    result = runner.invoke(main, ["show-kernel", "--target", "cpu", "--config", fused])
    assert result.exit_code == 0 and "c-fused" in result.output
    bad = runner.invoke(main, ["show-kernel", "--target", "cpu", "--config", '{"d_tile": "1; system()"}'])
    assert bad.exit_code == 2 and "--config" in bad.output and "Traceback" not in bad.output


def test_compile_check_builds_every_c_variant_of_a_small_space():
    result = CliRunner().invoke(
        main, ["compile-check", "--target", "cpu", "--width", "256", "--d-model", "16", "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows and all(r["ok"] for r in rows) and all(r["variant"].startswith("cpu[") for r in rows)
