"""Root pytest configuration: suite options, the ``claim`` recorder, and report writing.

Tests that settle a catalogue claim carry ``@pytest.mark.claim("Cxx", "title")`` and use the
``claim`` fixture to record what they measured. The controller process (also under xdist) merges
the records per claim id and rewrites ``claims.json`` / ``claims.md`` after every such test, so a
crash loses nothing already measured; ``claims.json`` says ``"complete": false`` (and
``claims.md`` "INCOMPLETE run") until the session finishes, with the exit status and the selection
(``-m``, ``-k``, paths, xdist workers) that ran. See docs/ARCHITECTURE.md.

Suite options (``turboquant/options.py``) are parsed once at configure time with the same parsers
as ``python -m turboquant verify``: a bad value is a ``pytest.UsageError`` naming the option before
any test runs, never a claim FAIL; ``tq_options`` hands the parsed values (lists of floats / ints,
paths) to the tests.

On a machine without CUDA, ``TRITON_INTERPRET=1`` is set at configure time (unless already set)
so that the Triton kernel tests run on CPU in CI.

Known failures (``KNOWN_FAILURES``): tests of claims that really fail with the default setting are
marked ``xfail(strict=...)``. Each entry records ``bounds``: a measured value (a key path into the
claim's ``measured`` dict), its recorded figure, which direction is worse, and a tolerance. After
the test body ran, :func:`pytest_runtest_makereport` reads the claim recorder's measured values; if
one is worse than recorded by more than its tolerance, or missing (the test failed before measuring
it), the xfail becomes a real failure: a known failure may not regress unseen.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from turboquant.gpu_workers import controller_gpus, worker_gpu
from turboquant.options import SUITE_OPTIONS, OptionError, parse_out_dir, parse_suite_options
from turboquant.report import (
    ClaimRecord,
    ClaimStore,
    _jsonable,
    device_description,
    load_plot_modules,
)

pytest_plugins = ["pytester"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("turboquant", "TurboQuant claim suite")
    group.addoption("--out-dir", default=None,
                    help="where claims.json/claims.md/plots go (default runs/<timestamp>)")
    for opt in SUITE_OPTIONS:
        if opt.is_switch:
            group.addoption(opt.pytest_flag, default=None,
                            help=f"{opt.help} (true/false, default {opt.default})")
        else:
            group.addoption(opt.pytest_flag, default=None,
                            help=opt.help + (f" (default {opt.default})" if opt.default else ""))


def _parse_options(config: pytest.Config) -> dict:
    """Every suite option parsed (defaults included); a bad value is a usage error naming it."""
    raw = {opt.name: config.getoption(opt.name) for opt in SUITE_OPTIONS}
    try:
        return parse_suite_options(raw, lambda opt: opt.pytest_flag)
    except OptionError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture(scope="session")
def tq_options(pytestconfig: pytest.Config) -> SimpleNamespace:
    """The suite options, parsed, with underscore names: e.g. ``needle_positions`` a list of floats
    or None, ``ann_required_scalar_bits`` a list of ints, ``throughput_repeats`` an int."""
    values = dict(pytestconfig._tq_values)  # type: ignore[attr-defined]
    values["out_dir"] = Path(pytestconfig._tq_out_dir)  # type: ignore[attr-defined]
    return SimpleNamespace(**values)


@pytest.fixture(autouse=True)
def _one_thread_for_synthetic_tests(request: pytest.FixtureRequest):
    """Small-tensor math runs fastest on one thread (OpenMP spin-waits dominate otherwise)."""
    if request.node.get_closest_marker("synthetic") is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root (where data/ lives)."""
    return Path(__file__).resolve().parent


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def run_selection(config: pytest.Config) -> dict:
    """What this session was asked to run: ``-m``, ``-k``, paths / node ids, xdist workers."""
    return {
        "markers": config.getoption("markexpr", None) or None,
        "keywords": config.getoption("keyword", None) or None,
        "args": [str(a) for a in config.args],
        "workers": getattr(config.option, "numprocesses", None),
        "invocation": shlex.join(str(a) for a in config.invocation_params.args),
    }


def pytest_configure(config: pytest.Config) -> None:
    if _is_xdist_worker(config) and config.workerinput.get("tq_cuda_device"):  # type: ignore[attr-defined]
        # one worker a GPU (turboquant.gpu_workers): before anything in this process touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = config.workerinput["tq_cuda_device"]  # type: ignore[attr-defined]
    if not torch.cuda.is_available():
        # CPU-only machines (CI): Triton's interpreter on before any test module imports Triton,
        # so the kernel tests' tiny CPU cases (tests/kernels, tests/cache/test_append_kernel.py)
        # run instead of skipping. The CPU cache and attention paths never take the kernels on
        # their own (append_backend "auto" uses them on CUDA tensors only).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    config._tq_values = _parse_options(config)  # type: ignore[attr-defined]
    out = config.getoption("out_dir") or os.environ.get("TURBOQUANT_OUT_DIR")
    if not out:
        out = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        if _is_xdist_worker(config):
            out = config.workerinput.get("tq_out_dir", out)  # type: ignore[attr-defined]
    config._tq_out_dir = out  # type: ignore[attr-defined]
    if not _is_xdist_worker(config):
        try:
            parse_out_dir(out)
        except OptionError as exc:
            raise pytest.UsageError(f"--out-dir {exc}") from None
        meta = {"device": device_description(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "options": config._tq_values}  # type: ignore[attr-defined]
        store = ClaimStore(Path(out), meta, run_selection(config))
        config._tq_store = store  # type: ignore[attr-defined]
        if (store.out_dir / "claims.json").exists():
            store.flush()  # an earlier run's report here must not pass for this (unfinished) run
        config._tq_outcomes = {}  # type: ignore[attr-defined]
        json_report = getattr(config.option, "json_report_file", None)
        # pytest-json-report: default report.json under the out dir when --out-dir is given.
        if (hasattr(config.option, "json_report_file") and config.getoption("out_dir")
                and json_report in (None, ".report.json")):
            config.option.json_report_file = str(Path(out) / "report.json")


def pytest_configure_node(node) -> None:  # xdist hook: share the controller's out dir, pin a GPU
    node.workerinput["tq_out_dir"] = node.config._tq_out_dir
    gpus = node.config.__dict__.setdefault("_tq_gpus", controller_gpus())
    node.workerinput["tq_cuda_device"] = worker_gpu(node.workerinput["workerid"], gpus)


@dataclass(frozen=True)
class Bound:
    """A recorded figure of a known failure: ``measured[path]`` may be worse than ``recorded`` (in
    the ``worse`` direction, "higher" or "lower") by at most ``tolerance``."""

    path: tuple[str, ...]
    recorded: float
    worse: str
    tolerance: float

    def __post_init__(self) -> None:
        if self.worse not in ("higher", "lower"):
            raise ValueError(f"Bound.worse must be 'higher' or 'lower', got {self.worse!r}")

    def violation(self, measured: dict) -> str | None:
        """None when the measured value is within the bound, else what is wrong."""
        name, value = ".".join(self.path), measured
        for key in self.path:
            if not isinstance(value, dict) or key not in value:
                return f"{name} was not measured (recorded {self.recorded:g})"
            value = value[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):  # NaN is None here
            return f"{name} = {value!r} is not a number (recorded {self.recorded:g})"
        higher = self.worse == "higher"
        limit = self.recorded + self.tolerance if higher else self.recorded - self.tolerance
        if (value > limit) if higher else (value < limit):
            return (f"{name} = {value:.4g} is worse than the recorded {self.recorded:g} by more "
                    f"than {self.tolerance:g} ({self.worse} is worse; limit {limit:g})")
        return None


@dataclass(frozen=True)
class KnownFailure:
    """A documented failing claim test: xfail(strict) under ``condition`` ("embedded": only with
    the embedded default model and data; "always"), and the recorded figures it may not pass."""

    condition: str
    strict: bool
    reason: str
    bounds: tuple[Bound, ...]


# Claims that really fail with the embedded defaults (SmolLM2 GGUF, shipped LongBench-E fixture) or
# on the lent H100. They are measured and recorded as FAIL every run; xfail keeps the suite's exit code
# for regressions. strict=True: if one starts passing, the run fails until this table is updated;
# a measurement worse than its recorded bound fails the run too. Each entry is explained in the
# README, section "Known failures"; the recorded figures are the README's.
KNOWN_FAILURES: dict[str, KnownFailure] = {
    # node id without parameters -> entry
    "tests/ann/test_claims_ann.py::test_c12_tq_beats_scalar_lm_embeddings": KnownFailure(
        "embedded", True,
        "C12 on the seed's raw LM-embedding recipe: scalar beats TurboQuant at 3-4 bits (shared "
        "mean direction)",
        # TQ - scalar recall@10 on the raw recipe: 0.634-0.531, 0.718-0.747, 0.796-0.861
        tuple(Bound(("lm", "tq_minus_scalar", str(b)), gap, "lower", 0.03)
              for b, gap in ((2, 0.103), (3, -0.029), (4, -0.065)))),
}
_KNOWN = pytest.StashKey[KnownFailure]()


def _embedded_defaults(config: pytest.Config) -> bool:
    return config.getoption("model_id") is None and config.getoption("longbench_local_dir") is None


TIERS = ("synthetic", "model", "integration", "gpu", "slow")  # pytest.ini's run tiers
_SUITE = Path(__file__).resolve().parent / "tests"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: an untiered test would vanish silently
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    untiered = [i.nodeid for i in items if Path(str(i.path)).resolve().is_relative_to(_SUITE)
                and not any(i.get_closest_marker(t) for t in TIERS)]
    if untiered:
        raise pytest.UsageError(f"{len(untiered)} test(s) carry none of the tier markers {TIERS}, so no documented "
                                f"command runs them: {untiered[:5]}")
    for item in items:
        known = KNOWN_FAILURES.get(item.nodeid.split("[")[0])
        if known is not None and (known.condition == "always" or _embedded_defaults(config)):
            item.add_marker(pytest.mark.xfail(strict=known.strict, reason=known.reason))
            item.stash[_KNOWN] = known
        mark = item.get_closest_marker("claim")
        if mark is not None:
            claim_id = mark.args[0]
            title = mark.args[1] if len(mark.args) > 1 else mark.kwargs.get("title", claim_id)
            item.user_properties.append(("tq_claim", json.dumps({"id": claim_id, "title": title})))
            item.extra_keyword_matches.add(claim_id)  # so `-k C03` selects a claim


class _Recorder:
    """The object a test uses to record one claim: setting, measured values, thresholds, warnings."""

    def __init__(self, claim_id: str, title: str, nodeid: str) -> None:
        self.record = ClaimRecord(id=claim_id, title=title, tests=[nodeid])
        self.record.setting["device"] = device_description()

    def setting(self, **kw) -> None:
        self.record.setting.update(kw)

    def measured(self, **kw) -> None:
        self.record.measured.update(kw)

    def threshold(self, **kw) -> None:
        self.record.thresholds.update(kw)

    def warn(self, reason: str) -> None:
        """Mark the claim WARN: inside the PASS threshold but worse than the seed's figure."""
        self.record.status = "WARN"
        self.record.reasons.append(reason)

    def note(self, reason: str) -> None:
        self.record.reasons.append(reason)

    def decide(self, name: str, scores, full_scores, margin: float, kind: str = "continuous",
               score_range: float = 1.0, primary: bool = True, **extra):
        """Apply the decision rule (:func:`turboquant.verdicts.decide`) to one recipe's paired scores;
        record its fields under ``measured.recipes.<name>`` (plus ``extra``, e.g. measured bits). The
        primary comparison also sets ``measured.verdict`` and turns the claim WARN when inconclusive;
        the caller asserts ``verdict.status != "FAIL"``. Returns the :class:`Verdict`."""
        from turboquant.verdicts import decide

        verdict = decide(scores, full_scores, margin, kind=kind, score_range=score_range)
        entry = {**verdict.to_dict(), **extra}
        self.record.measured.setdefault("recipes", {})[name] = entry
        if primary:
            self.record.measured["verdict"] = {"recipe": name, **entry}
            if verdict.status == "WARN":
                self.warn(f"{name}: {verdict.reason}")
            else:
                self.note(f"{name}: {verdict.reason}")
        return verdict


@pytest.fixture
def claim(request: pytest.FixtureRequest):
    """Recorder for the claim named by the test's ``@pytest.mark.claim`` marker."""
    mark = request.node.get_closest_marker("claim")
    if mark is None:
        raise pytest.UsageError(f"{request.node.nodeid} uses `claim` without @pytest.mark.claim")
    title = mark.args[1] if len(mark.args) > 1 else mark.kwargs.get("title", mark.args[0])
    rec = _Recorder(mark.args[0], title, request.node.nodeid)
    yield rec
    request.node.user_properties.append(("tq_record", json.dumps(rec.record.to_dict())))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A known failure (xfailed) whose measurement is worse than its recorded bound, or missing,
    becomes a real failure."""
    report = yield
    known = item.stash.get(_KNOWN, None)
    if known is None or call.when != "call" or not (report.skipped and hasattr(report, "wasxfail")):
        return report
    recorder = getattr(item, "funcargs", {}).get("claim")
    measured = _jsonable(recorder.record.measured) if recorder is not None else {}
    problems = [p for b in known.bounds if (p := b.violation(measured))]
    if problems:
        report.outcome = "failed"
        del report.wasxfail
        report.longrepr = (f"{report.longrepr}\n\n" if report.longrepr else "") + (
            "known failure regressed beyond its recorded bound (KNOWN_FAILURES in conftest.py): "
            + "; ".join(problems))
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Controller side: fold each test's phases into a claim record and flush the report files."""
    config = _CONFIG.get("config")
    if config is None or not hasattr(config, "_tq_store"):
        return
    props = dict(report.user_properties)
    if "tq_claim" not in props:
        return
    state = config._tq_outcomes.setdefault(report.nodeid, {"outcome": "passed", "reason": ""})
    crash = getattr(report.longrepr, "reprcrash", None)
    message = crash.message if crash is not None else (report.longreprtext.strip().splitlines() or [""])[-1]
    if hasattr(report, "wasxfail"):
        # A documented known failure (xfail): the claim is FAIL, pytest's exit code stays clean.
        # An xfail test whose assertions pass (XPASS) records the claim as PASS.
        if report.skipped:
            state["outcome"] = "xfailed"
            state["reason"] = f"known failure ({report.wasxfail}): {message}"[:600]
        else:
            state["outcome"] = "xpassed"
            state["reason"] = f"passed although marked as a known failure ({report.wasxfail}): update the marker"
    elif report.failed:
        if "XPASS(strict)" in report.longreprtext:
            state["outcome"] = "xpassed"
            state["reason"] = f"passed although marked as a known failure: update the marker ({report.longreprtext[:200]})"
        else:
            state["outcome"] = "failed"
            state["reason"] = f"{report.when}: {message}"[:500]
    elif report.skipped and state["outcome"] == "passed":
        state["outcome"] = "skipped"
        longrepr = report.longrepr
        state["reason"] = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    if report.when != "teardown":
        return
    meta = json.loads(props["tq_claim"])
    if "tq_record" in props:
        record = json.loads(props["tq_record"])
    else:
        record = ClaimRecord(id=meta["id"], title=meta["title"], tests=[report.nodeid]).to_dict()
    if state["outcome"] in ("failed", "xfailed"):
        record["status"] = "FAIL"
        record["reason"] = "; ".join(r for r in (record.get("reason"), state["reason"]) if r)
    elif state["outcome"] == "xpassed":
        record["reason"] = "; ".join(r for r in (record.get("reason"), state["reason"]) if r)
    elif state["outcome"] == "skipped":
        record["status"] = "SKIP"
        record["reason"] = state["reason"].removeprefix("Skipped: ")
    config._tq_store.add(record)


_CONFIG: dict = {}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG["config"] = session.config


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Plots, then mark the report complete with the exit status (a killed run never gets here)."""
    store = getattr(session.config, "_tq_store", None)
    if store is None or not (store.claims or (store.out_dir / "claims.json").exists()):
        return
    if store.claims:
        load_plot_modules()
        store.draw_plots()
    store.finish(int(exitstatus))


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    store = getattr(config, "_tq_store", None)
    if store is None or not store.claims:
        return
    tr = terminalreporter
    tr.section("TurboQuant claims")
    for rec in store.as_list():
        tr.write_line(f"{rec['id']:>4} {rec['status']:<4} {rec['title']}")
    c = {s: 0 for s in ("PASS", "WARN", "FAIL", "SKIP")}
    for rec in store.as_list():
        c[rec["status"]] += 1
    tr.write_line(" ".join(f"{k}={v}" for k, v in c.items())
                  + f"   -> {store.out_dir}/claims.json")
