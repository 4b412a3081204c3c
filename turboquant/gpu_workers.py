"""One pytest-xdist worker a GPU: ``pytest -m gpu -n <gpus>`` spreads the gpu tier over the GPUs.

The controller lists the GPUs it may use (``TURBOQUANT_GPUS="0,1"``, else its own
``CUDA_VISIBLE_DEVICES``, else every device CUDA reports) and hands worker ``gw<i>`` GPU
``i mod n``; the worker sets ``CUDA_VISIBLE_DEVICES`` to that one id before anything in it touches
CUDA, so each test process sees exactly one GPU as ``cuda:0``. Claim records still merge in the
controller (root ``conftest.py``).
"""

from __future__ import annotations

import os
import re

GPUS_ENV = "TURBOQUANT_GPUS"


def _ids(text: str, name: str) -> list[str]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    for gpu in ids:
        if not re.fullmatch(r"\d+|GPU-[0-9a-fA-F-]+|MIG-[0-9a-zA-Z/-]+", gpu):
            raise ValueError(f"`{name}`={text!r}: expected a comma list of GPU indices or UUIDs, got {gpu!r}")
    return ids


def controller_gpus(environ: dict | None = None) -> list[str]:
    """GPU ids the controller spreads its workers over (empty: no GPU, no pinning)."""
    env = os.environ if environ is None else environ
    if env.get(GPUS_ENV):
        return _ids(env[GPUS_ENV], GPUS_ENV)
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return _ids(env["CUDA_VISIBLE_DEVICES"], "CUDA_VISIBLE_DEVICES")
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except (ImportError, RuntimeError):  # no torch / no driver: nothing to pin
        return []


def worker_gpu(worker_id: str, gpus: list[str]) -> str | None:
    """The GPU of xdist worker ``gw<i>``: ``gpus[i mod len(gpus)]`` (``None`` without GPUs)."""
    m = re.fullmatch(r"gw(\d+)", worker_id)
    if m is None:
        raise ValueError(f"`worker_id`={worker_id!r} is not an xdist worker id (gw0, gw1, ...)")
    return gpus[int(m.group(1)) % len(gpus)] if gpus else None
