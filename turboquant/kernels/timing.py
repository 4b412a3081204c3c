"""Timing helpers shared by the GPU benchmarks and the C11 GPU claim test (CUDA only)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def graph_time_ms(make_call: Callable[[int], Callable[[], object]], n_sets: int, reps: int = 20) -> float:
    """Median latency (ms) of one call, from CUDA-graph replays of ``n_sets`` calls over distinct
    buffer sets (``make_call(i)`` returns the i-th call): launch gaps removed, and with enough
    sets the working set exceeds L2, so each call reads its data from device memory."""
    calls = [make_call(i) for i in range(n_sets)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:  # compile / allocate outside the capture
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / n_sets)
    times.sort()
    return times[len(times) // 2]
