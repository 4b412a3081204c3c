"""The GPU static end-to-end benchmark's code paths run on CPU (``--device cpu --tiny``): caches
built, filled to the context through their write paths, decoded; every row measured, none failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_gpu_e2e_static_cpu_smoke(repo_root: Path, tmp_path: Path):
    out = tmp_path / "static.json"
    cmd = [sys.executable, str(repo_root / "benchmarks" / "gpu_e2e_static.py"), "--device", "cpu", "--tiny",
           "--cases", "2x32768", "--max-batch-list", "1,2", "--steps", "2", "--warmup", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=repo_root, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = [r for r in result["rows"] if "max_batch" not in r]
    assert {r["cache"] for r in rows} == {"bf16", "tq3.5", "tq2.5", "tqpaper-3.5"}
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    assert all(r["ms_per_step"] > 0 and r["kv_gib"] > 0 for r in rows)
    tq = [r for r in rows if r["cache"] == "tq3.5" and r["batch"] == 2 and r["context"] == 256]
    bf = [r for r in rows if r["cache"] == "bf16" and r["batch"] == 2 and r["context"] == 256]
    assert tq[0]["kv_gib"] < bf[0]["kv_gib"]  # compressed bytes really held
    assert {"device", "torch", "transformers", "triton", "date_utc"} <= result["meta"].keys()
