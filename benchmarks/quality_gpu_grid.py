"""GPU tier of the quality grid: every recipe and baseline, parallel workers on one GPU, resumable.

One call starts ``--workers`` processes (:mod:`turboquant.eval.grid`, one model each; SmolLM2-135M
leaves the GPU mostly idle per process) that claim chunks in priority order (QA 200 for every
setting, next-token KL, the paper recipes' remaining needles, the baselines' needles, then quanto,
which may build a CUDA extension first) until
``--budget-s`` runs out, then merges everything into ``<out>/quality_gpu.json`` (+ plots) and packs
the state into ``<out>/quality_grid_state.tar.gz``. A second call with the same ``--state``
continues with what is missing (finished cases are never recomputed). The first call imports the
needle outcomes of the earlier H200 run (``results/quality_gpu_logs/part*.log``), so the 500-needle
evidence is kept and the paper recipes continue from the cases they reached.

The two calls (on one H200, repo root; ``.whl/`` carries gguf, optimum-quanto, hqq, termcolor,
einops wheels)::

    pip install -q --no-deps .whl/*.whl && python benchmarks/quality_gpu_grid.py \\
        --state runs/quality_grid --budget-s 500 --out $OUT
    # again, same command (--budget-s 540 when the machine is already set up); on a fresh machine,
    # first unpack the returned quality_grid_state.tar.gz into runs/quality_grid and carry it
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from turboquant.eval import grid
from turboquant.eval.recipes import GRID_NAMES, RECIPES

OLD_LOGS = sorted((ROOT / "results" / "quality_gpu_logs").glob("part[0-9].log"))
MERGE_RESERVE_S = 45  # merge, plots and the state archive after the workers stop
KILL_GRACE_S = 30  # a worker checks the deadline between cases; one case takes seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--state", default="runs/quality_grid", help="state directory (resume: the same one)")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/quality_gpu_out"))
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall time of this call, merge included")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--recipes", default=",".join(GRID_NAMES),
                    help=f"comma list; valid: {list(RECIPES)}")
    tier = grid.GPU_TIER  # the GPU tier's grid, the one `pytest -m gpu` runs for C09/C10
    ap.add_argument("--needle-lengths", default=",".join(map(str, tier.needle_lengths)))
    ap.add_argument("--needle-trials", type=int, default=tier.needle_trials)
    ap.add_argument("--qa-lengths", default=",".join(map(str, tier.qa_lengths)))
    ap.add_argument("--qa-per-cell", type=int, default=tier.qa_per_cell, help="x lengths x 5 positions")
    ap.add_argument("--kl-prompts", type=int, default=tier.kl_prompts)
    ap.add_argument("--kl-tokens", type=int, default=tier.kl_tokens)
    ap.add_argument("--seed-logs", nargs="*", default=[str(p) for p in OLD_LOGS],
                    help="runner logs whose needle lines are imported once (default: the earlier H200 run's)")
    ap.add_argument("--name", default="quality_gpu", help="result file stem under --out")
    ap.add_argument("--threads", type=int, default=1, help="torch threads a worker")
    return ap.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> grid.GridSpec:
    names = tuple(n.strip() for n in args.recipes.split(",") if n.strip())
    return grid.GridSpec(names=names, needle_lengths=tuple(int(x) for x in args.needle_lengths.split(",")),
                         needle_trials=args.needle_trials, qa_per_cell=args.qa_per_cell,
                         qa_lengths=tuple(int(x) for x in args.qa_lengths.split(",")),
                         kl_prompts=args.kl_prompts, kl_tokens=args.kl_tokens)


def prepare(state: Path, spec: grid.GridSpec, logs: list[str]) -> dict[str, int]:
    """Create / check the state; import the logs' needle lines once (marker file ``seeded``)."""
    grid.init_state(state, spec)
    marker = state / "seeded"
    if not logs or marker.is_file():
        return {}
    counts = grid.seed_from_logs(state, spec, [Path(p) for p in logs])
    marker.write_text(json.dumps({"logs": [Path(p).name for p in logs], "imported": counts}))
    return counts


def start_workers(args: argparse.Namespace, state: Path, call: str, deadline: float, log_dir: Path) -> list:
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = []
    for i in range(args.workers):
        fh = (log_dir / f"worker{i:02d}.log").open("a")
        cmd = [sys.executable, "-m", "turboquant.eval.grid_worker", "--state", str(state), "--call", call,
               "--deadline", f"{deadline:.1f}", "--device", args.device, "--threads", str(args.threads)]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT), fh))
    return procs


def wait_workers(procs: list, kill_at: float) -> list[int | None]:
    while time.time() < kill_at and any(p.poll() is None for p, _ in procs):
        time.sleep(2)
    codes = []
    for p, fh in procs:
        if p.poll() is None:
            p.kill()  # only the workers this launcher started
            p.wait()
        codes.append(p.returncode)
        fh.close()
    return codes


def meta(args: argparse.Namespace, call: str, seconds: float) -> dict:
    import torch
    import transformers

    from turboquant.eval.quality import package_versions

    device = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else \
        f"cpu {platform.processor()}"
    return {"device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
            "transformers": transformers.__version__, "packages": package_versions(("optimum-quanto", "hqq", "triton")),
            "model": "SmolLM2-135M-Instruct (embedded GGUF, float32)", "threads": args.threads, "last_call": call,
            "last_call_seconds": round(seconds, 1), "workers": args.workers,
            "needle_seed_logs": [str(Path(p).resolve().relative_to(ROOT)) if Path(p).resolve().is_relative_to(ROOT)
                                 else str(p) for p in args.seed_logs]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    state, out = Path(args.state), Path(args.out)
    spec = spec_from_args(args)  # unknown recipe names raise listing the valid ones
    imported = prepare(state, spec, args.seed_logs)
    if imported:
        print(f"imported from the earlier logs: {imported}", flush=True)
    call = time.strftime("%Y%m%d-%H%M%S")
    deadline = t0 + args.budget_s - MERGE_RESERVE_S - KILL_GRACE_S
    procs = start_workers(args, state, call, deadline, out / "quality_grid_logs")
    codes = wait_workers(procs, deadline + KILL_GRACE_S)
    print(f"workers exited {codes} after {time.time() - t0:.0f} s", flush=True)

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality_merge

    result = quality_merge.merge_grid(state, meta(args, call, time.time() - t0))
    from turboquant.eval.quality import save_result

    out.mkdir(parents=True, exist_ok=True)
    save_result(result, out / f"{args.name}.json")
    (out / f"{args.name}_table.md").write_text(quality_merge.readme_table(result) + "\n")
    with tarfile.open(out / "quality_grid_state.tar.gz", "w:gz") as tar:
        tar.add(state, arcname="quality_grid", filter=lambda ti: None if "/claims" in ti.name else ti)
    done = grid.progress(state, spec)
    left = {t: {s: len(spec.keys(t)) - n for s, n in by.items() if n < len(spec.keys(t))} for t, by in done.items()}
    print(json.dumps({"progress": done, "left": left, "skipped": result["skipped"]}, indent=1))
    print(f"wrote {out}/{args.name}.json ({time.time() - t0:.0f} s)")
    return result


if __name__ == "__main__":
    main()
