"""``python -m turboquant verify``: run the claim suite (pytest) and write the report.

Accepts the seed review's launch flags in their own spelling (``--model_id``,
``--needle_context_tokens``, ``--out_dir``, ...; dashed spellings work too), so the seed's full
command runs verbatim with ``python -m turboquant verify`` in place of ``python3 turboquant.py``.
Every value is checked by argparse with the parsers of ``turboquant/options.py`` before any work:
a bad one exits with status 2 and a message naming the flag and the allowed values. Writes under
``--out_dir``: ``report.json`` (pytest-json-report), ``claims.json`` (flushed per claim),
``claims.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from turboquant.options import (
    SUITE_OPTIONS,
    OptionError,
    SuiteOption,
    parse_out_dir,
    parse_positive_int,
)

SUITES = {
    "synthetic": "synthetic",
    "model": "model",
    "gpu": "gpu",
    "all": "synthetic or model or gpu",
}

# Value options are forwarded to the pytest options of the same name (dashes); booleans are
# switches.
VALUE_FLAGS = [o for o in SUITE_OPTIONS if not o.is_switch]
# Seed switches: accepted for compatibility. The suites they enabled always run here.
SEED_SWITCHES: list[tuple[str, str]] = [
    ("load_model", "accepted; the model suite always loads the selected model"),
    ("run_longbench", "accepted; LongBench-E (C10) always runs in the model suite"),
    ("run_throughput", "accepted; decode throughput (C11) always runs in the model suite"),
]


def checked(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse ``type``: validate with the option's parser, keep the text (it is forwarded to
    pytest, which parses it again with the same parser)."""

    def check(text: str) -> str:
        try:
            parse(text)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    check.__name__ = getattr(parse, "__name__", "value")
    return check


def _help(opt: SuiteOption) -> str:
    return opt.help + (f" (default {opt.default})" if opt.default else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m turboquant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="run the claim suite and write the report",
                       description="Run the TurboQuant claim suite (pytest) and write report.json, "
                                   "claims.json, claims.md and plots.")
    v.add_argument("--suite", default="all", type=checked(suite_expression),
                   help="which tests: synthetic | model | gpu | all, or a comma list "
                        "(default all; gpu tests skip without CUDA)")
    v.add_argument("--out_dir", "--out-dir", dest="out_dir", default=None,
                   type=checked(parse_out_dir),
                   help="report directory, created if missing; must be writable "
                        "(default runs/<timestamp>)")
    v.add_argument("--local_files_only", "--local-files-only", dest="local_files_only",
                   action="store_true", default=True,
                   help="never download (default; hub access is not needed)")
    v.add_argument("--allow_downloads", dest="local_files_only", action="store_false",
                   help="let transformers download --model_id from the hub")
    v.add_argument("--ann_use_qwen_embeddings", "--ann-use-qwen-embeddings", action="store_true",
                   help=next(o.help for o in SUITE_OPTIONS if o.name == "ann_use_qwen_embeddings"))
    for opt in VALUE_FLAGS:
        v.add_argument(f"--{opt.name}", opt.pytest_flag, dest=opt.name, default=opt.default,
                       type=checked(opt.parse), help=_help(opt))
    for name, help_text in SEED_SWITCHES:
        v.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, action="store_true",
                       help=help_text)
    v.add_argument("-n", "--workers", default=None, type=checked(_workers),
                   help="pytest-xdist workers (a count, or auto); default: one process")
    v.add_argument("pytest_args", nargs=argparse.REMAINDER,
                   help="anything after `--` goes to pytest unchanged (e.g. -- -k C03 -x)")
    return parser


def _workers(text: str) -> str:
    """pytest-xdist's ``-n``: a positive count or ``auto`` / ``logical``."""
    if text in ("auto", "logical"):
        return text
    try:
        parse_positive_int(text)
    except OptionError:
        raise OptionError(f"must be an integer >= 1, auto or logical, got {text!r}") from None
    return text


def suite_expression(suite: str) -> str:
    """``--suite`` (a name of :data:`SUITES` or a comma list of them) -> a ``-m`` expression."""
    parts = [p.strip() for p in suite.split(",") if p.strip()]
    unknown = [p for p in parts if p not in SUITES]
    if unknown or not parts:
        raise OptionError(
            f"must be one of {', '.join(SUITES)} or a comma list of them, got {suite!r}")
    return " or ".join(f"({SUITES[p]})" for p in parts)


def default_out_dir() -> Path:
    """``runs/<timestamp>`` under the current directory."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def pytest_argv(args: argparse.Namespace, tests_dir: Path) -> list[str]:
    out_dir = Path(args.out_dir or default_out_dir())
    root = tests_dir.parent
    argv = [str(tests_dir), f"--rootdir={root}", "-c", str(root / "pytest.ini"),
            "-m", suite_expression(args.suite), f"--out-dir={out_dir}",
            "--json-report", f"--json-report-file={out_dir / 'report.json'}",
            "--json-report-indent=1",
            f"--local-files-only={str(args.local_files_only).lower()}",
            f"--ann-use-qwen-embeddings={str(args.ann_use_qwen_embeddings).lower()}"]
    for opt in VALUE_FLAGS:
        value = getattr(args, opt.name)
        if value is not None:
            argv.append(f"{opt.pytest_flag}={value}")
    if args.workers:
        argv += ["-n", str(args.workers)]
    extra = list(args.pytest_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    return argv + extra


def find_tests_dir() -> Path:
    root = Path(__file__).resolve().parent.parent
    tests = root / "tests"
    if not (tests.is_dir() and (root / "conftest.py").is_file()):
        raise SystemExit(
            f"the claim suite's tests were not found next to the package ({tests}); run from a "
            "checkout of turboquant-verify installed with `pip install -e .`"
        )
    return tests


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # every value is checked here: exit 2 before any work
    if args.command == "verify":
        import os

        import pytest

        # Paths are the user's (relative to the current directory), not the checkout's: pytest runs
        # from the checkout, so make them absolute first. The default out dir is checked here too.
        args.out_dir = str(Path(args.out_dir or default_out_dir()).absolute())
        try:
            parse_out_dir(args.out_dir)
        except OptionError as exc:
            print(f"python -m turboquant verify: error: argument --out_dir/--out-dir: {exc}",
                  file=sys.stderr)
            return 2
        for name in ("longbench_local_dir", "model_id"):
            value = getattr(args, name)
            if value is not None and Path(value).exists():
                setattr(args, name, str(Path(value).absolute()))
        tests = find_tests_dir()
        os.chdir(tests.parent)
        code = pytest.main(pytest_argv(args, tests))
        return int(code)
    return 2


if __name__ == "__main__":
    sys.exit(main())
