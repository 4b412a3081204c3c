"""Where a claim record keeps each compared cache: TurboQuant recipes (and ``full``) under
``measured.recipes.<name>``, baselines under ``measured.baselines.<name>``; a recipe or baseline
that cannot run on the model is a row ``{"status": "SKIP", "reason": ...}`` in its group."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from turboquant.eval.recipes import get_recipe


def group_of(name: str) -> str:
    """``"baselines"`` for a baseline, ``"recipes"`` otherwise (unknown names raise)."""
    return "baselines" if get_recipe(name).family == "baseline" else "recipes"


def file_row(measured: dict, name: str) -> None:
    """Move ``measured["recipes"][name]`` (where the recorder's ``decide`` puts every row) to the
    group of ``name``."""
    group = group_of(name)
    if group != "recipes":
        measured.setdefault(group, {})[name] = measured["recipes"].pop(name)


def skip_rows(measured: dict, skipped: Mapping[str, str]) -> None:
    """One SKIP row with its reason for each recipe / baseline that cannot run."""
    for name, reason in skipped.items():
        if not reason:
            raise ValueError(f"{name!r} is skipped without a reason")
        measured.setdefault(group_of(name), {})[name] = {"status": "SKIP", "reason": reason}


def decide_and_file(claim: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    """``claim.decide(name, ...)`` (the decision rule), then :func:`file_row`; returns the verdict."""
    verdict = claim.decide(name, *args, **kwargs)
    file_row(claim.record.measured, name)
    return verdict
