"""TurboQuantCache under transformers tensor parallelism (issue 16): each rank compresses its own
KV heads (``tp_size=model.tp_size``), and the output equals the single-process run within the
tolerance of the all-reduce order. Two CPU processes over gloo show the mechanism on any machine;
the GPU variant (NCCL) needs 2 GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from turboquant.cache import TurboQuantCache
from turboquant.models import tiny_config, tiny_model

WORKER = Path(__file__).with_name("tp_worker.py")
TOL = 1e-4  # float32 logits: a row-parallel all-reduce sums in another order than one GEMM
SHAPE = {"head_dim": 64, "num_layers": 2, "num_kv_heads": 2, "num_heads": 4, "hidden_size": 128}


def _worker_result(model_dir: Path, out: Path, nproc: int | None, env: dict | None = None) -> dict:
    cmd = [sys.executable, str(WORKER), str(model_dir), str(out)]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *cmd[1:]]
    # the worker imports this checkout's turboquant also where it is not pip-installed
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=run_env, cwd=Path.cwd(),
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _compare(tp: dict, single: dict, world: int) -> None:
    assert tp["tp_size"] == world
    for bits in ("16", "3.5"):
        got, ref = torch.tensor(tp[bits]["logits"]), torch.tensor(single[bits]["logits"])
        diff = (got - ref).abs().max().item()
        assert diff <= TOL, f"{bits} bits: TP logits differ from one process by {diff:.3g} (allowed {TOL})"
        assert tp[bits]["tokens"] == single[bits]["tokens"], f"{bits} bits: greedy tokens differ"
    assert set(tp["3.5"]["kv_heads_held"]) == {SHAPE["num_kv_heads"] // world}, "each rank holds its own heads"


@pytest.mark.integration  # two CPU processes over gloo
def test_tensor_parallel_cpu_two_ranks_equal_one_process(tmp_path):
    tiny_model("llama", seed=0, **SHAPE).save_pretrained(tmp_path / "model")
    single = _worker_result(tmp_path / "model", tmp_path / "single.json", None)
    tp = _worker_result(tmp_path / "model", tmp_path / "tp.json", 2, {"CUDA_VISIBLE_DEVICES": ""})
    _compare(tp, single, 2)


@pytest.mark.gpu
def test_tensor_parallel_two_gpus_equal_one_gpu(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs for NCCL tensor parallel, {torch.cuda.device_count()} visible")
    tiny_model("llama", seed=0, **SHAPE).save_pretrained(tmp_path / "model")
    single = _worker_result(tmp_path / "model", tmp_path / "single.json", None, {"CUDA_VISIBLE_DEVICES": "0"})
    tp = _worker_result(tmp_path / "model", tmp_path / "tp.json", 2)
    _compare(tp, single, 2)


@pytest.mark.synthetic
@pytest.mark.parametrize("tp_size", [0, 3, 1.5, True])
def test_tp_size_must_divide_the_kv_heads(tp_size):
    with pytest.raises(ValueError, match="`tp_size`"):
        TurboQuantCache(tiny_config("llama", **SHAPE), tp_size=tp_size)


@pytest.mark.synthetic
def test_tp_rank_shape_is_checked_with_a_hint():
    cache = TurboQuantCache(tiny_config("llama", **SHAPE))
    with pytest.raises(ValueError, match="tp_size=model.tp_size"):
        cache.update(torch.randn(1, 1, 4, 64), torch.randn(1, 1, 4, 64), 0)
    sharded = TurboQuantCache(tiny_config("llama", **SHAPE), tp_size=2)
    sharded.update(torch.randn(1, 1, 4, 64), torch.randn(1, 1, 4, 64), 0)
    assert sharded.get_seq_length(0) == 4
