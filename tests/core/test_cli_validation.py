"""Suite options are checked before any work: the CLI exits 2 naming the flag and the allowed
values, pytest raises a usage error at configure time naming the option, and the tests receive
parsed values. A usage error is never a claim verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from turboquant.__main__ import main
from turboquant.options import (
    OptionError,
    parse_out_dir,
    parse_suite_options,
)

pytestmark = pytest.mark.synthetic

BIT_WIDTHS = "1, 1.5, 2, 2.5, 3, 3.5, 4"

# (flag in the seed's spelling, bad value, a fragment of the allowed values the message must state)
BAD_VALUES = [
    ("--needle_positions", "abc", "numbers in [0, 1]"),
    ("--needle_positions", "1.5", "numbers in [0, 1]"),
    ("--needle_positions", "0.5,-0.1", "numbers in [0, 1]"),
    ("--needle_positions", "0.5,,0.9", "numbers in [0, 1]"),
    ("--needle_context_tokens", "abc", "token counts >= 1"),
    ("--needle_context_tokens", "1024,0", "token counts >= 1"),
    ("--needle_trials", "0", "integer >= 1"),
    ("--needle_trials", "1.5", "integer >= 1"),
    ("--needle_required_bits", "5", BIT_WIDTHS),
    ("--needle_required_bits", "three", BIT_WIDTHS),
    ("--longbench_required_bits", "0.5", BIT_WIDTHS),
    ("--longbench_max_examples", "-2", "integer >= 1"),
    ("--longbench_max_prompt_tokens", "many", "integer >= 1"),
    ("--longbench_local_dir", "/nonexistent/longbench", "existing directory"),
    ("--throughput_new_tokens", "0", "integer >= 1"),
    ("--throughput_warmup", "-1", "integer >= 0"),
    ("--throughput_repeats", "2.5", "integer >= 1"),
    ("--ann_required_scalar_bits", "5", "integers from {1, 2, 3, 4}"),
    ("--ann_required_scalar_bits", "2.7", "integers from {1, 2, 3, 4}"),
    ("--ann_required_scalar_bits", "2,x", "integers from {1, 2, 3, 4}"),
    ("--ann_pq_index_speedup_threshold", "0", "number > 0"),
    ("--ann_pq_index_speedup_threshold", "fast", "number > 0"),
    ("--torch_dtype", "float64", "float32, bfloat16, float16"),
    ("--attn_implementation", "flash", "sdpa, eager"),
    ("--suite", "fast", "synthetic, model, gpu, all"),
    ("-n", "0", "integer >= 1, auto or logical"),
    ("--kv_layout", "paper-4", "halves-3.5, halves-2.5, halves-1.5, paper-3.5, paper-2.5"),
    ("--key_layout", "outliers-20-4-3", "outliers-<n_out>-<b_hi>-<b_lo>"),
    ("--value_layout", "halves-5", "paper-3.5"),
]


@pytest.fixture
def no_pytest_run(monkeypatch):
    """Fail the test if the CLI ever starts pytest (the check must come before any work)."""

    def refuse(*args, **kwargs):
        raise AssertionError("pytest.main was called: the value was not checked before the run")

    monkeypatch.setattr(pytest, "main", refuse)


def _cli_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["verify", *argv])
    assert exc.value.code == 2, f"exit code {exc.value.code} for {argv}"
    return capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value", "allowed"), BAD_VALUES,
                         ids=[f"{f}={v}" for f, v, _ in BAD_VALUES])
def test_cli_refuses_a_bad_value_with_exit_2_naming_flag_and_allowed_values(
        capsys, no_pytest_run, tmp_path, flag, value, allowed):
    err = _cli_error(capsys, ["--out_dir", str(tmp_path / "out"), flag, value])
    assert flag in err and allowed in err and repr(value) in err, err


@pytest.mark.parametrize("spelling", ["--needle_positions", "--needle-positions"])
def test_cli_checks_both_spellings_of_a_flag(capsys, no_pytest_run, spelling):
    assert "numbers in [0, 1]" in _cli_error(capsys, [spelling, "abc"])


def test_cli_out_dir_that_is_a_file_is_refused(capsys, no_pytest_run, tmp_path):
    afile = tmp_path / "report.txt"
    afile.write_text("not a directory")
    for target in (afile, afile / "sub"):
        err = _cli_error(capsys, ["--out_dir", str(target)])
        assert "--out_dir" in err and "can be created and written" in err, err
    assert afile.read_text() == "not a directory"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (unwritable even as root)")
def test_cli_out_dir_in_an_unwritable_place_is_refused(capsys, no_pytest_run):
    err = _cli_error(capsys, ["--out_dir", "/proc/turboquant-report"])
    assert "--out_dir" in err and "not writable" in err, err


def test_cli_default_out_dir_is_checked_too(capsys, no_pytest_run, monkeypatch, tmp_path):
    """No --out_dir: the default runs/<timestamp> under the current directory is checked."""
    blocked = tmp_path / "cwd"
    blocked.mkdir()
    (blocked / "runs").write_text("a file where the runs/ folder would go")
    monkeypatch.chdir(blocked)
    assert main(["verify"]) == 2
    assert "--out_dir" in capsys.readouterr().err


def test_out_dir_check_leaves_nothing_behind(tmp_path):
    target = tmp_path / "new" / "nested"
    assert parse_out_dir(str(target)) == target
    assert list(tmp_path.iterdir()) == [], "the writability probe must not create files or folders"


def test_options_parse_to_typed_values(tmp_path):
    raw = {"needle_positions": "0.25, 0.75", "needle_context_tokens": "1024,2k",
           "ann_required_scalar_bits": "4,2", "needle_trials": "3", "longbench_local_dir": str(tmp_path),
           "local_files_only": "false"}
    values = parse_suite_options(raw, lambda opt: opt.pytest_flag)
    assert values["needle_positions"] == [0.25, 0.75]
    assert values["needle_context_tokens"] == [1024, 2048]
    assert values["ann_required_scalar_bits"] == [4, 2] and values["needle_trials"] == 3
    assert values["longbench_local_dir"] == tmp_path and values["local_files_only"] is False
    # defaults are parsed too; options without a default stay None (the test's own default applies)
    assert values["needle_required_bits"] == 3.5 and values["throughput_repeats"] == 3
    assert values["ann_pq_index_speedup_threshold"] == 10.0 and values["longbench_max_examples"] is None
    with pytest.raises(OptionError, match=r"^--needle-trials must be an integer >= 1, got '0'"):
        parse_suite_options({"needle_trials": "0"}, lambda opt: opt.pytest_flag)


# -- pytest's own options: the same parsers, a usage error at configure time --------------------
INNER = '''
import pytest

@pytest.mark.claim("C90", "reads the options")
def test_reads_options(claim, tq_options):
    claim.measured(positions=tq_options.needle_positions)
    assert tq_options.needle_positions == [0.25, 0.75]
    assert tq_options.ann_required_scalar_bits == [2, 3, 4]
    assert tq_options.needle_required_bits == 3.5 and tq_options.throughput_repeats == 3
    assert tq_options.needle_context_tokens == [1024, 4096]
'''


@pytest.fixture
def inner_suite(pytester, repo_root):
    pytester.makeconftest((repo_root / "conftest.py").read_text())
    pytester.makeini((repo_root / "pytest.ini").read_text().replace("testpaths = tests\n", ""))
    pytester.makepyfile(test_inner=INNER)
    return pytester


PYTEST_BAD = [
    ("--needle-positions", "abc", "numbers in [0, 1]"),
    ("--ann-required-scalar-bits", "2.7", "integers from {1, 2, 3, 4}"),
    ("--ann-required-scalar-bits", "5", "integers from {1, 2, 3, 4}"),
    ("--longbench-local-dir", "/nonexistent/longbench", "existing directory"),
    ("--needle-required-bits", "3.7", BIT_WIDTHS),
    ("--local-files-only", "maybe", "true or false"),
]


@pytest.mark.parametrize(("flag", "value", "allowed"), PYTEST_BAD,
                         ids=[f"{f}={v}" for f, v, _ in PYTEST_BAD])
def test_pytest_option_bad_value_is_a_usage_error_before_any_test(inner_suite, flag, value, allowed):
    out = inner_suite.path / "out"
    result = inner_suite.runpytest_inprocess("--out-dir", str(out), f"{flag}={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    err = result.stderr.str()
    assert flag in err and allowed in err, err
    assert not out.exists(), "a usage error must not write a claim report"


def test_pytest_out_dir_that_is_a_file_is_a_usage_error(inner_suite):
    afile = inner_suite.path / "afile"
    afile.write_text("x")
    result = inner_suite.runpytest_inprocess("--out-dir", str(afile))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--out-dir" in result.stderr.str() and "can be created and written" in result.stderr.str()


def test_pytest_tests_receive_parsed_option_values(inner_suite):
    out = inner_suite.path / "out"
    result = inner_suite.runpytest_inprocess("--out-dir", str(out), "--needle-positions=0.25,0.75",
                                             "--needle-context-tokens=1024,4k")
    result.assert_outcomes(passed=1)
    doc = json.loads((out / "claims.json").read_text())
    assert doc["claims"][0]["measured"] == {"positions": [0.25, 0.75]}
    assert doc["meta"]["options"]["needle_positions"] == [0.25, 0.75]



def test_help_lists_every_layout_with_its_measured_bits(capsys):
    """``--help`` names each layout preset with the bits a coordinate its bytes hold (norms
    included), read from the layout: paper-3.5 is 3.5 bits at head_dim 128 (52 code bytes + 2
    float16 norms), 3.75 at head_dim 64."""
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("--kv_layout", "--key_layout", "--value_layout", "paper-3.5 (3.75 / 3.5)",
                     "paper-2.5 (2.75 / 2.5)", "halves-3.5 (3.75 / 3.62)"):
        assert fragment in text, f"{fragment!r} missing from verify --help"


def test_layout_options_pick_the_verdict_recipe_and_build_its_cache():
    """``--kv_layout paper-3.5 --value_layout halves-2.5`` -> the C09/C10 verdict recipe
    ``Kpaper-3.5/Vhalves-2.5``, a TurboQuantCache with exactly those layouts; no layout option ->
    the paper's recipe at the required bits."""
    from types import SimpleNamespace

    from turboquant.eval.recipes import claim_recipe, get_recipe
    from turboquant.models import tiny_config

    cfg = tiny_config("llama", head_dim=64, num_layers=2, num_kv_heads=2, num_heads=4, hidden_size=64)
    values = parse_suite_options({"kv_layout": "paper-3.5", "value_layout": "halves-2.5"}, lambda o: o.name)
    opts = SimpleNamespace(**values)
    name, note = claim_recipe(opts, "3.5", cfg)
    assert name == "Kpaper-3.5/Vhalves-2.5" and "user layouts" in note
    cache = get_recipe(name).build(cfg)
    assert (cache.settings.key_layout, cache.settings.value_layout) == ("paper-3.5", "halves-2.5")
    plain = SimpleNamespace(**parse_suite_options({}, lambda o: o.name))
    assert claim_recipe(plain, "2.5", cfg) == ("paper-2.5", None)
