"""Root pytest configuration: suite options, the ``claim`` recorder, and report writing.

Tests that settle a catalogue claim carry ``@pytest.mark.claim("Cxx", "title")`` and use the
``claim`` fixture to record what they measured. The controller process (also under xdist) merges
the records per claim id and rewrites ``claims.json`` / ``claims.md`` after every such test, so a
crash loses nothing already measured. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from turboquant.gpu_workers import controller_gpus, worker_gpu
from turboquant.options import SUITE_OPTIONS
from turboquant.report import ClaimRecord, ClaimStore, device_description, load_plot_modules

pytest_plugins = ["pytester"]



def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("turboquant", "TurboQuant claim suite")
    group.addoption("--out-dir", default=None, help="where claims.json/claims.md/plots go (default runs/<timestamp>)")
    for name, default, help_text in SUITE_OPTIONS:
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            group.addoption(flag, default=None, help=f"{help_text} (true/false, default {default})")
        else:
            group.addoption(flag, default=default, help=help_text)


def _as_bool(value: object, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise pytest.UsageError(f"expected true/false, got {value!r}")


@pytest.fixture(scope="session")
def tq_options(pytestconfig: pytest.Config) -> SimpleNamespace:
    """The suite options with underscore names (booleans parsed)."""
    values = {}
    for name, default, _ in SUITE_OPTIONS:
        raw = pytestconfig.getoption(name)
        values[name] = _as_bool(raw, default) if isinstance(default, bool) else raw
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


def pytest_configure(config: pytest.Config) -> None:
    if _is_xdist_worker(config) and config.workerinput.get("tq_cuda_device"):  # type: ignore[attr-defined]
        # one worker a GPU (turboquant.gpu_workers): before anything in this process touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = config.workerinput["tq_cuda_device"]  # type: ignore[attr-defined]
    out = config.getoption("out_dir") or os.environ.get("TURBOQUANT_OUT_DIR")
    if not out:
        out = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        if _is_xdist_worker(config):
            out = config.workerinput.get("tq_out_dir", out)  # type: ignore[attr-defined]
    config._tq_out_dir = out  # type: ignore[attr-defined]
    if not _is_xdist_worker(config):
        meta = {"device": device_description(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        config._tq_store = ClaimStore(Path(out), meta)  # type: ignore[attr-defined]
        config._tq_outcomes = {}  # type: ignore[attr-defined]
        json_report = getattr(config.option, "json_report_file", None)
        if hasattr(config.option, "json_report_file") and config.getoption("out_dir"):
            # pytest-json-report: default report.json under the out dir when --out-dir is given.
            if json_report in (None, ".report.json"):
                config.option.json_report_file = str(Path(out) / "report.json")


def pytest_configure_node(node) -> None:  # xdist hook: share the controller's out dir, pin a GPU
    node.workerinput["tq_out_dir"] = node.config._tq_out_dir
    gpus = node.config.__dict__.setdefault("_tq_gpus", controller_gpus())
    node.workerinput["tq_cuda_device"] = worker_gpu(node.workerinput["workerid"], gpus)


# Claims that really fail with the embedded defaults (SmolLM2 GGUF, shipped LongBench-E fixture) or on
# the lent H100. They are measured and recorded as FAIL every run; xfail keeps the suite's exit code
# for regressions. strict=True: if one starts passing, the run fails until this table is updated.
# Each entry is explained in the README, section "Known failures".
KNOWN_FAILURES: dict[str, tuple[str, bool, str]] = {
    # node id suffix: (condition, strict, reason)
    "tests/ann/test_claims_ann.py::test_c12_tq_beats_scalar_lm_embeddings": (
        "embedded", True,
        "C12 on the seed's raw LM-embedding recipe: scalar beats TurboQuant at 3-4 bits (shared mean direction)"),
    "tests/longctx/test_longbench.py::test_longbench_e_claim": (
        "embedded", True,
        "C10 on the 6-example shipped fixture: the 3.5-bit drop exceeds 1 point"),
    "tests/longctx/test_needle.py::test_needle_grid_gpu": (
        "always", False,
        "C09 GPU grid (1k-8k x 5 depths x 4 trials, H100): 3.5-bit 0.93 < full 0.96 - 0.02"),
}


def _embedded_defaults(config: pytest.Config) -> bool:
    return config.getoption("model_id") is None and config.getoption("longbench_local_dir") is None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        known = KNOWN_FAILURES.get(item.nodeid.split("[")[0])
        if known is not None and (known[0] == "always" or _embedded_defaults(config)):
            item.add_marker(pytest.mark.xfail(strict=known[1], reason=known[2]))
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


def pytest_sessionfinish(session: pytest.Session) -> None:
    store = getattr(session.config, "_tq_store", None)
    if store is None or not store.claims:
        return
    load_plot_modules()
    store.draw_plots()


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
    tr.write_line(" ".join(f"{k}={v}" for k, v in c.items()) + f"   -> {store.out_dir}/claims.json")
