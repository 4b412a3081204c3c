"""tests/core: a test without a tier marker is ``synthetic``; the few that run real subprocess
suites (xdist) carry ``integration`` instead, so they stay out of the 60 s synthetic budget."""

from __future__ import annotations

import pytest

TIERS = ("synthetic", "model", "gpu", "integration")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith("tests/core/") and not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.synthetic)
