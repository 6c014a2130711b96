"""Cost of the NaN/inf checks (``sar_dist.finite``): the same merge with checks on and with
``allow_nonfinite: true``, side by side in one run.

Run (from the repo root, after `make setup`):
    .venv/bin/python bench/finite_bench.py [--workdir bench/out/finite] [--repeats 3] [--micro]

Builds two synthetic Llama-shaped models that differ only in depth (hidden 1024, 2 and 12
layers; bf16) with three RLVR-like fine-tunes each, then merges each with ``task_arithmetic``
and ``ties`` (local executor, in this process, compute float32, output bf16, memory budget
256 MiB), checks on and off alternately, ``--repeats`` times each. Reports the min and median wall
and CPU time per size and the marginal GB/s between the sizes (extra bytes read / extra seconds:
start-up, planning and commit cancel out). On a shared 2-vCPU machine the run-to-run spread
(10-20%) exceeds the cost of the checks, so one more run per size times every check itself (seconds
inside ``finite.all_finite``, per thread) and reports that as a share of the merge's wall time. ``--micro`` first times the candidate reductions
on one bf16 and one fp32 tensor. Results go to WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sar_dist.config import MergeJob  # noqa: E402
from sar_dist.execute.run import execute, prepare  # noqa: E402
from sar_dist.plan.planner import build_plan  # noqa: E402
from sar_dist.storage import Storage  # noqa: E402
from sar_dist.synthetic import LlamaShape, make_base, make_finetune  # noqa: E402

BUDGET = 256 * 2**20
METHODS = {
    "task_arithmetic": {"weight": 1.0},
    "ties": {"density": 0.5, "weight": 1.0},
}


def build(root: Path, layers: int) -> dict[str, str]:
    shape = LlamaShape(hidden=1024, layers=layers, heads=16, kv_heads=4, intermediate=4096, vocab=32000)
    storage = Storage()
    paths = {k: str(root / f"L{layers}" / k) for k in ("base", "ft1", "ft2", "ft3")}
    if not Path(paths["ft3"], "config.json").exists():
        t = time.time()
        make_base(storage, paths["base"], shape, seed=0, max_shard_bytes=500_000_000)
        for i, k in enumerate(("ft1", "ft2", "ft3")):
            make_finetune(storage, paths["base"], paths[k], seed=i + 1, density=0.01, max_shard_bytes=500_000_000)
        print(f"built the {layers}-layer models in {time.time() - t:.0f}s", flush=True)
    return paths


def input_bytes(paths: dict[str, str]) -> int:
    return sum(p.stat().st_size for k in ("base", "ft1", "ft2", "ft3") for p in Path(paths[k]).glob("*.safetensors"))


def merge_once(paths: dict[str, str], method: str, out: Path, allow: bool) -> tuple[float, float]:
    """(wall s, CPU s of this process) of one merge into a fresh output."""
    shutil.rmtree(out, ignore_errors=True)
    job = MergeJob.from_dict({
        "merge_method": method, "base_model": paths["base"],
        "models": [{"model": paths[k]} for k in ("ft1", "ft2", "ft3")],
        "parameters": METHODS[method], "dtype": "float32", "out_dtype": "bfloat16",
        "output": str(out), "allow_nonfinite": allow,
    })
    t, c = time.perf_counter(), time.process_time()
    execute(prepare(build_plan(job, memory_budget=BUDGET)), executor="local")
    return time.perf_counter() - t, time.process_time() - c


def micro() -> list[dict]:
    """Time the candidate checks on a 4096 x 4096 tensor (best of 10)."""
    from sar_dist.finite import all_finite

    def best(f, x, n=10) -> float:
        f(x)
        out = math.inf
        for _ in range(n):
            t = time.perf_counter()
            f(x)
            out = min(out, time.perf_counter() - t)
        return out

    candidates = {
        "torch.isfinite(x).all()": lambda x: bool(torch.isfinite(x).all()),
        "torch.aminmax(x), both finite": lambda x: all(math.isfinite(v.item()) for v in torch.aminmax(x)),
        "x.sum() finite (sar_dist.finite.all_finite)": all_finite,
    }
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(4096, 4096).to(dtype)
        gb = x.numel() * x.element_size() / 1e9
        for name, f in candidates.items():
            s = best(f, x)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "check": name, "ms": round(s * 1e3, 3),
                         "gb_s": round(gb / s, 1)})
            print(f"  {rows[-1]['dtype']:9s} {name:45s} {s * 1e3:7.2f} ms  {gb / s:6.1f} GB/s", flush=True)
    return rows


def accounted(paths: dict[str, str], method: str, out: Path) -> dict[str, float]:
    """One merge with checks on, timing every check (``finite.all_finite``) per thread: what the
    checks themselves cost, free of the run-to-run noise of a shared machine."""
    from sar_dist import finite

    spent: dict[str, float] = {}
    original = finite.all_finite

    def timed(x: torch.Tensor) -> bool:
        t = time.perf_counter()
        try:
            return original(x)
        finally:
            name = "main" if threading.current_thread() is threading.main_thread() else "prefetch"
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t

    finite.all_finite = timed
    try:
        wall, _ = merge_once(paths, method, out, allow=False)
    finally:
        finite.all_finite = original
    return {"wall_s": round(wall, 3), **{f"{k}_check_s": round(v, 3) for k, v in sorted(spent.items())}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(REPO / "bench" / "out" / "finite"))
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--layers", type=int, nargs=2, default=(2, 12), metavar=("SMALL", "LARGE"))
    ap.add_argument("--micro", action="store_true", help="also time the candidate reductions")
    args = ap.parse_args()
    work = Path(args.workdir)
    results: dict = {"machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(),
                                 "torch": torch.__version__, "processor": platform.processor() or platform.machine()},
                     "repeats": args.repeats, "memory_budget": BUDGET}
    if args.micro:
        print(f"reductions, {torch.get_num_threads()} torch threads:", flush=True)
        results["micro"] = micro()
    models = {layers: build(work / "models", layers) for layers in args.layers}
    sizes = {layers: input_bytes(p) for layers, p in models.items()}
    small, large = args.layers
    runs: dict[str, dict] = {}
    table = []
    for method in METHODS:
        stats: dict[tuple[str, int, str, str], float] = {}  # (setting, layers, wall|cpu, min|median)
        runs[method] = {}
        for layers, paths in models.items():
            merge_once(paths, method, work / "out", True)  # warm the page cache and the code paths
            samples: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
            for r in range(args.repeats):
                for setting in (("on", "off") if r % 2 == 0 else ("off", "on")):
                    samples[setting].append(merge_once(paths, method, work / "out", allow=setting == "off"))
            acc = accounted(paths, method, work / "out")
            runs[method][layers] = {"samples": samples, "accounted": acc}
            for setting, pairs in samples.items():
                for i, kind in enumerate(("wall", "cpu")):
                    xs = [p[i] for p in pairs]
                    stats[setting, layers, kind, "min"] = min(xs)
                    stats[setting, layers, kind, "median"] = statistics.median(xs)
            checks = sum(v for k, v in acc.items() if k.endswith("_check_s"))
            print(f"{method:16s} {layers:2d} layers, {sizes[layers] / 1e9:.2f} GB read: wall min/median on "
                  f"{stats['on', layers, 'wall', 'min']:.2f}/{stats['on', layers, 'wall', 'median']:.2f} s, off "
                  f"{stats['off', layers, 'wall', 'min']:.2f}/{stats['off', layers, 'wall', 'median']:.2f} s; "
                  f"time inside the checks {acc} = {100 * checks / acc['wall_s']:.1f}% of that run", flush=True)
        row: dict = {"method": method}
        for setting in ("on", "off"):
            for layers in (small, large):
                for kind in ("wall", "cpu"):
                    for agg in ("min", "median"):
                        row[f"{setting}_{layers}L_{kind}_{agg}_s"] = round(stats[setting, layers, kind, agg], 3)
            for kind in ("wall", "cpu"):
                for agg in ("min", "median"):
                    extra = stats[setting, large, kind, agg] - stats[setting, small, kind, agg]
                    row[f"{setting}_marginal_gb_per_{kind}_s_{agg}"] = round((sizes[large] - sizes[small]) / 1e9 / extra, 3)
        for layers in (small, large):
            acc = runs[method][layers]["accounted"]
            row[f"{layers}L_check_pct"] = round(
                100 * sum(v for k, v in acc.items() if k.endswith("_check_s")) / acc["wall_s"], 2)
        table.append(row)
    shutil.rmtree(work / "out", ignore_errors=True)
    results.update(sizes_bytes={str(k): v for k, v in sizes.items()}, table=table, runs=runs)
    print(f"\n| method | checks | {small}L wall s (min / median) | {large}L wall s (min / median) | "
          f"marginal GB/s, wall (min / median) | marginal GB per CPU s (min / median) |")
    print("|---|---|---:|---:|---:|---:|")
    for row in table:
        for setting, label in (("on", "on"), ("off", "off (`allow_nonfinite: true`)")):
            cells = [f"{row[f'{setting}_{n}L_wall_min_s']:.2f} / {row[f'{setting}_{n}L_wall_median_s']:.2f}"
                     for n in (small, large)]
            cells += [f"{row[f'{setting}_marginal_gb_per_{k}_s_min']:.3f} / {row[f'{setting}_marginal_gb_per_{k}_s_median']:.3f}"
                      for k in ("wall", "cpu")]
            print(f"| {row['method']} | {label} | " + " | ".join(cells) + " |")
    for row in table:
        print(f"{row['method']}: time inside the checks, one run each: {row[f'{small}L_check_pct']}% ({small} layers), "
              f"{row[f'{large}L_check_pct']}% ({large} layers) of the merge's wall time")
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
