"""``pytest -m gpu -n <gpus>``: each xdist worker is pinned to one GPU (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from turboquant.gpu_workers import controller_gpus, worker_gpu

# tier: synthetic unless marked otherwise (tests/core/conftest.py)

ROOT = Path(__file__).resolve().parents[2]


def test_workers_take_gpus_round_robin():
    gpus = ["0", "1"]
    assert [worker_gpu(f"gw{i}", gpus) for i in range(5)] == ["0", "1", "0", "1", "0"]
    assert worker_gpu("gw3", []) is None


def test_controller_gpus_reads_the_override_then_cuda_visible_devices():
    assert controller_gpus({"TURBOQUANT_GPUS": "2,5", "CUDA_VISIBLE_DEVICES": "0"}) == ["2", "5"]
    assert controller_gpus({"CUDA_VISIBLE_DEVICES": "1, 3"}) == ["1", "3"]
    assert controller_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


@pytest.mark.parametrize("bad", ["0,x", "1;2"])
def test_bad_gpu_list_is_refused_naming_the_variable(bad):
    with pytest.raises(ValueError, match="`TURBOQUANT_GPUS`"):
        controller_gpus({"TURBOQUANT_GPUS": bad})
    with pytest.raises(ValueError, match="not an xdist worker id"):
        worker_gpu("main", ["0"])


@pytest.mark.integration  # a real xdist run in subprocesses
def test_each_xdist_worker_sees_its_own_gpu(pytester, monkeypatch):
    """A real ``-n 2`` run with the suite's conftest: worker gw<i> runs with CUDA_VISIBLE_DEVICES = gpus[i]."""
    pytester.makeconftest((ROOT / "conftest.py").read_text())
    pytester.makeini((ROOT / "pytest.ini").read_text().replace("testpaths = tests", "testpaths = ."))
    pytester.makepyfile(test_seen="""
        import json, os, pathlib
        import pytest

        @pytest.mark.parametrize("i", range(6))
        def test_record(i):
            w = os.environ["PYTEST_XDIST_WORKER"]
            pathlib.Path(f"seen_{w}_{i}.json").write_text(json.dumps(os.environ.get("CUDA_VISIBLE_DEVICES")))
    """)
    monkeypatch.setenv("TURBOQUANT_GPUS", "4,7")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # this checkout's turboquant, not an installed copy
    result = pytester.runpytest_subprocess("-n", "2", "-p", "xdist", f"--out-dir={pytester.path / 'out'}")
    result.assert_outcomes(passed=6)
    seen = {p.name.split("_")[1]: json.loads(p.read_text()) for p in pytester.path.glob("seen_*.json")}
    assert seen == {"gw0": "4", "gw1": "7"}
