"""Claim records -> ``claims.json``, ``claims.md`` and PNG plots.

A *claim* is one row of the catalogue in ``../shared/DESIGN.md`` (C01 ... C14). Each pytest test
that settles (part of) a claim contributes a :class:`ClaimRecord`; records with the same id are
merged, their status being the worst of the contributing tests (FAIL > WARN > PASS), SKIP only
when every contributing test skipped.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("PASS", "WARN", "FAIL", "SKIP")
_SEVERITY = {"SKIP": 0, "PASS": 1, "WARN": 2, "FAIL": 3}

PlotFn = Callable[[dict, Path], list]
_PLOTS: dict[str, list[PlotFn]] = {}


def register_plot(claim_id: str) -> Callable[[PlotFn], PlotFn]:
    """Register ``fn(record, out_dir) -> [png paths]`` to draw a plot from a claim's record."""

    def deco(fn: PlotFn) -> PlotFn:
        _PLOTS.setdefault(claim_id, []).append(fn)
        return fn

    return deco


def device_description() -> str:
    """A short description of the compute device the process uses (GPU name or CPU model)."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}"
        threads = torch.get_num_threads()
    except (ImportError, RuntimeError):  # no torch or no usable CUDA: still report the CPU
        threads = os.cpu_count()
    return f"cpu {platform.processor() or platform.machine()} ({threads} threads)"


def _jsonable(value: Any) -> Any:
    """Convert numpy / torch scalars and containers into plain JSON values (NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@dataclass
class ClaimRecord:
    """What one test measured for one claim."""

    id: str
    title: str
    status: str = "PASS"
    measured: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    setting: dict = field(default_factory=dict)
    reasons: list = field(default_factory=list)
    tests: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return _jsonable(
            {
                "id": self.id,
                "title": self.title,
                "status": self.status,
                "measured": self.measured,
                "thresholds": self.thresholds,
                "setting": self.setting,
                "reason": "; ".join(r for r in self.reasons if r),
                "tests": self.tests,
            }
        )


def merge_records(old: dict | None, new: dict) -> dict:
    """Merge a test's record into the claim's accumulated record (worst status wins)."""
    if old is None:
        return json.loads(json.dumps(new))
    merged = dict(old)
    for key in ("measured", "thresholds", "setting"):
        merged[key] = {**old.get(key, {}), **new.get(key, {})}
    if _SEVERITY[new["status"]] > _SEVERITY[old["status"]]:
        merged["status"] = new["status"]
    reasons = [r for r in (old.get("reason", ""), new.get("reason", "")) if r]
    merged["reason"] = "; ".join(dict.fromkeys("; ".join(reasons).split("; "))) if reasons else ""
    merged["tests"] = list(dict.fromkeys(old.get("tests", []) + new.get("tests", [])))
    return merged


def counts(claims: list[dict]) -> dict:
    out = {s: 0 for s in STATUSES}
    for c in claims:
        out[c["status"]] += 1
    return out


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _short_number(v: float) -> str:
    """3 significant digits (4 between 1000 and 1e6, no exponent there): 0.3617 -> 0.362."""
    if not math.isfinite(v):
        return str(v)
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    if 1000 <= abs(v) < 1e6:
        return str(round(v))
    return f"{v:.3g}"


def _numeric_key(key: Any) -> bool:
    try:
        float(key)
    except (TypeError, ValueError):
        return False
    return True


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def short(value: Any, limit: int = 160) -> str:
    """A short human form of a measured value: numbers to 3-4 significant digits, lists as
    ``a/b/c``, numeric-keyed dicts as ``1/2/3/4: a/b/c/d``, other dicts as ``k=v, ...``, nesting in
    braces; cut to ``limit`` characters with an ellipsis."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if v is None:
            return "-"
        if isinstance(v, (int, float)):
            return _short_number(float(v)) if isinstance(v, float) else str(v)
        if isinstance(v, str):
            return v
        if isinstance(v, (list, tuple)):
            parts = [fmt(x) for x in v]
            return "/".join(parts) if all(_scalar(x) for x in v) else "[" + ", ".join(parts) + "]"
        if isinstance(v, dict):
            if v and all(_scalar(x) for x in v.values()) and all(_numeric_key(k) for k in v):
                return "/".join(str(k) for k in v) + ": " + "/".join(fmt(x) for x in v.values())
            return ", ".join(f"{k}={'{' + fmt(x) + '}' if isinstance(x, dict) else fmt(x)}"
                             for k, x in v.items())
        return str(v)

    text = fmt(_jsonable(value))
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(claims: list[dict], meta: dict | None = None, run: dict | None = None) -> str:
    """One line a claim (id, verdict, title, measured values and thresholds in short form, reason),
    under the seed-style 'At a Glance' counts; an unfinished run says INCOMPLETE at the top. The
    full records are in ``claims.json``."""
    c = counts(claims)
    lines = ["# TurboQuant claims report", ""]
    if run is not None and not run.get("complete"):
        lines += [("**INCOMPLETE run**: the session has not finished (still running, killed or "
                   "crashed); the claims below are those recorded so far."), ""]
    lines += ["## At a Glance", ""]
    lines += [f"{s} = {c[s]}  " for s in STATUSES] + [""]
    if run is not None:
        done = run.get("complete")
        state = f"complete, exit status {run.get('exit_status')}" if done else "INCOMPLETE"
        lines.append(f"- run: {state}")
        sel = {k: " ".join(map(str, v)) if isinstance(v, list) else v
               for k, v in (run.get("selection") or {}).items()}
        chosen = {k: v for k, v in sel.items() if v not in (None, "")}
        lines.append("- selection: " + (short(chosen, 300) or "everything collected"))
    for key, value in (meta or {}).items():
        if isinstance(value, dict):  # e.g. the suite options: only those that are set
            value = {k: v for k, v in value.items() if v is not None}
        lines.append(f"- {key}: {short(value, 300)}")
    lines += ["", "| id | verdict | claim | measured | thresholds | reason |",
              "|---|---|---|---|---|---|"]
    for rec in sorted(claims, key=lambda r: r["id"]):
        cells = [rec["id"], f"**{rec['status']}**", rec["title"],
                 short(rec.get("measured", {}), 240), short(rec.get("thresholds", {}), 160),
                 short(rec.get("reason") or "", 200)]
        lines.append("| " + " | ".join(_cell(x) for x in cells) + " |")
    return "\n".join(lines) + "\n"


class ClaimStore:
    """Accumulates claim records and rewrites the report files after every update.

    ``claims.json`` carries ``complete`` (false until :meth:`finish` is called at the clean end of
    the session), the ``exit_status`` then, and the ``selection`` that ran, so a killed run is
    recognisable as partial."""

    def __init__(self, out_dir: Path, meta: dict | None = None,
                 selection: dict | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.meta = meta or {}
        self.run = {"complete": False, "exit_status": None, "selection": selection or {}}
        self.claims: dict[str, dict] = {}

    def add(self, record: dict) -> None:
        record = _jsonable(record)
        self.claims[record["id"]] = merge_records(self.claims.get(record["id"]), record)
        self.flush()

    def finish(self, exit_status: int) -> None:
        """The session ended cleanly with ``exit_status``: mark the report complete."""
        self.run.update(complete=True, exit_status=int(exit_status))
        self.flush()

    def as_list(self) -> list[dict]:
        return [self.claims[k] for k in sorted(self.claims)]

    def flush(self) -> None:
        claims = self.as_list()
        doc = {**_jsonable(self.run), "meta": _jsonable(self.meta), "claims": claims,
               "counts": counts(claims)}
        # the Markdown first: whoever sees a claim in claims.json (the file tools poll) finds it
        # in claims.md too, even if the process dies between the two writes
        _atomic_write(self.out_dir / "claims.md", render_markdown(claims, self.meta, self.run))
        _atomic_write(self.out_dir / "claims.json", json.dumps(doc, indent=2) + "\n")

    def draw_plots(self) -> list[Path]:
        """Run every registered plot whose claim has a record; a failing plot never loses data."""
        written: list[Path] = []
        for claim_id, fns in _PLOTS.items():
            record = self.claims.get(claim_id)
            if record is None or record["status"] == "SKIP":
                continue
            for fn in fns:
                try:
                    written += [Path(p) for p in fn(record, self.out_dir)]
                except Exception as exc:  # noqa: BLE001  (report it, never crash the run)
                    record.setdefault("plot_errors", []).append(f"{fn.__name__}: {exc!r}")
        self.flush()
        return written


def load_plot_modules() -> None:
    """Import the modules that register plots (each import is optional)."""
    import importlib

    for name in ("turboquant.plots", "turboquant.eval.plots", "turboquant.ann"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
