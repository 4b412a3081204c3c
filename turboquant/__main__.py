"""``python -m turboquant verify``: run the claim suite (pytest) and write the report.

Accepts the seed review's launch flags in their own spelling (``--model_id``, ``--needle_context_tokens``,
``--out_dir``, ...; dashed spellings work too), so the seed's full command runs verbatim with
``python -m turboquant verify`` in place of ``python3 turboquant.py``. Writes under ``--out_dir``:
``report.json`` (pytest-json-report), ``claims.json`` (flushed per claim), ``claims.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SUITES = {
    "synthetic": "synthetic",
    "model": "model",
    "gpu": "gpu",
    "all": "synthetic or model or gpu",
}

from turboquant.options import SUITE_OPTIONS

# Value options are forwarded to the pytest options of the same name (dashes); booleans are switches.
VALUE_FLAGS = [(n, d, h) for n, d, h in SUITE_OPTIONS if not isinstance(d, bool)]
# Seed switches: accepted for compatibility. The suites they enabled always run here.
SEED_SWITCHES: list[tuple[str, str]] = [
    ("load_model", "accepted; the model suite always loads the selected model"),
    ("run_longbench", "accepted; LongBench-E (C10) always runs in the model suite"),
    ("run_throughput", "accepted; decode throughput (C11) always runs in the model suite"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m turboquant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="run the claim suite and write the report",
                       description="Run the TurboQuant claim suite (pytest) and write report.json, claims.json, claims.md and plots.")
    v.add_argument("--suite", default="all",
                   help="which tests: synthetic | model | gpu | all, or a comma list (default all; gpu tests skip without CUDA)")
    v.add_argument("--out_dir", "--out-dir", dest="out_dir", default=None,
                   help="report directory (default runs/<timestamp>)")
    v.add_argument("--local_files_only", "--local-files-only", dest="local_files_only", action="store_true", default=True,
                   help="never download (default; hub access is not needed)")
    v.add_argument("--allow_downloads", dest="local_files_only", action="store_false",
                   help="let transformers download --model_id from the hub")
    v.add_argument("--ann_use_qwen_embeddings", "--ann-use-qwen-embeddings", action="store_true",
                   help=dict((n, h) for n, _, h in SUITE_OPTIONS)["ann_use_qwen_embeddings"])
    for name, default, help_text in VALUE_FLAGS:
        v.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, default=default,
                       help=help_text + (f" (default {default})" if default else ""))
    for name, help_text in SEED_SWITCHES:
        v.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, action="store_true", help=help_text)
    v.add_argument("-n", "--workers", default=None, help="pytest-xdist workers (e.g. 2); default: one process")
    v.add_argument("pytest_args", nargs=argparse.REMAINDER,
                   help="anything after `--` goes to pytest unchanged (e.g. -- -k C03 -x)")
    return parser


def suite_expression(suite: str) -> str:
    parts = [p.strip() for p in suite.split(",") if p.strip()]
    unknown = [p for p in parts if p not in SUITES]
    if unknown or not parts:
        raise SystemExit(f"--suite must be one of {sorted(SUITES)} or a comma list of them, got {suite!r}")
    return " or ".join(f"({SUITES[p]})" for p in parts)


def pytest_argv(args: argparse.Namespace, tests_dir: Path) -> list[str]:
    out_dir = Path(args.out_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    root = tests_dir.parent
    argv = [str(tests_dir), f"--rootdir={root}", "-c", str(root / "pytest.ini"),
            "-m", suite_expression(args.suite), f"--out-dir={out_dir}",
            "--json-report", f"--json-report-file={out_dir / 'report.json'}", "--json-report-indent=1",
            f"--local-files-only={str(args.local_files_only).lower()}",
            f"--ann-use-qwen-embeddings={str(args.ann_use_qwen_embeddings).lower()}"]
    for name, default, _ in VALUE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            argv.append(f"--{name.replace('_', '-')}={value}")
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
            f"the claim suite's tests were not found next to the package ({tests}); run from a checkout of "
            "turboquant-verify installed with `pip install -e .`"
        )
    return tests


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "verify":
        import os

        import pytest

        tests = find_tests_dir()
        os.chdir(tests.parent)
        code = pytest.main(pytest_argv(args, tests))
        return int(code)
    return 2


if __name__ == "__main__":
    sys.exit(main())
