"""Fisher memory per rank: does a ZeRO-3 rank's peak fall as 1/R with R ranks per group?

Run (from the repo root, after `make setup`):
    RAY_AUTH_MODE=disabled .venv/bin/python bench/fisher_memory_bench.py [--ranks 1 2 4] [--workdir bench/out/fisher_memory]

Builds the issue's Llama-shaped model (hidden 2048, 16 layers, vocab 32000, MLP 5632: about 0.85B
parameters, bf16 on disk) and 4 examples of 64 tokens, then runs `sar-dist fisher --dtype bfloat16`
with R = 1, 2, 4 ranks per group, side by side in one run. Each rank records its resident memory
at the phases of a part (`fisher.json`, `parts[].memory`: built, loaded, engine, after_loop, peak).
The bench also measures `fixed`: the RSS of a process that has imported what a rank imports and
built nothing. Per rank and R it prints: fixed; weights (loaded - fixed: this rank's partitions of
the weights plus the build); accumulators and engine (after_loop - loaded: the float32 sums and
what DeepSpeed keeps); transient (peak - after_loop: gathered layers, activations, one gradient).
The projection takes the measured model-dependent bytes per parameter per rank,
(peak - fixed) * R / N at the largest R, and gives fixed + bpp * N / R for Llama-3-70B and a
Qwen3-235B-A22B-shaped MoE at R = 8, 16, 32 (it assumes the transient stays bounded, as measured).
Results go to WORKDIR/results.json; bench/README.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sar_dist.storage import Storage  # noqa: E402
from sar_dist.synthetic import LlamaShape, make_base  # noqa: E402

SHAPES = {
    "0.85b": LlamaShape(hidden=2048, layers=16, heads=16, kv_heads=4, intermediate=5632, vocab=32000),
    "121m": LlamaShape(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=32000),
}
# parameter counts of the projected models (their published configs)
PROJECTED = {"Llama-3-70B": 70.6e9, "Qwen3-235B-A22B": 235.1e9}
GIB = 2**30

FIXED_PROBE = """
import os, sys
sys.path.insert(0, sys.argv[1])
import torch, transformers, deepspeed, ray  # what a rank imports
import sar_dist.fisher.worker  # noqa: F401
with open("/proc/self/statm") as f:
    print(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
"""


def build(workdir: Path, shape: LlamaShape, examples: int, seq: int) -> tuple[Path, Path]:
    model = workdir / "model"
    if not (model / "config.json").exists():
        make_base(Storage(), str(model), shape, seed=0, max_shard_bytes=2_000_000_000)
    data = workdir / f"data-{examples}x{seq}.jsonl"
    g = torch.Generator().manual_seed(0)
    with data.open("w") as f:
        for _ in range(examples):
            ids = torch.randint(3, shape.vocab, (seq,), generator=g).tolist()
            f.write(json.dumps({"input_ids": ids, "labels": ids}) + "\n")
    return model, data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=str(REPO / "bench" / "out" / "fisher_memory"))
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.85b")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--examples", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    args = p.parse_args()
    shape = SHAPES[args.shape]
    workdir = Path(args.workdir) / args.shape
    workdir.mkdir(parents=True, exist_ok=True)
    model, data = build(workdir, shape, args.examples, args.seq)
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    fixed = int(subprocess.run([sys.executable, "-c", FIXED_PROBE, str(REPO)], capture_output=True, text=True,
                               check=True, env=env).stdout.split()[-1])
    n = shape.num_parameters
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
               "parameters": n, "examples": args.examples, "seq": args.seq, "fixed_bytes": fixed, "runs": {}}
    for r in args.ranks:
        out = workdir / f"r{r}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sar_dist.cli", "fisher", "--model", str(model), "--data", str(data),
                        "--output", str(out), "--dtype", "bfloat16", "--ranks-per-group", str(r),
                        "--num-cpus", str(max(r, os.cpu_count() or 1)), "--max-length", str(args.seq)],
                       check=True, env=env, cwd=REPO)
        manifest = json.loads((out / "fisher.json").read_text())
        part = manifest["parts"][0]
        ranks = []
        for mem in part["memory"]:
            ranks.append({"fixed": fixed, "weights": mem["loaded"] - fixed, "accumulators_engine": mem["after_loop"] - mem["loaded"],
                          "transient": mem["peak"] - mem["after_loop"], "peak": mem["peak"], "phases": mem})
        results["runs"][r] = {"engine": manifest["engine"], "wall_s": round(time.perf_counter() - t, 1),
                              "compute_s": part["compute_s"], "ranks": ranks,
                              "largest_peak": max(x["peak"] for x in ranks)}
        print(f"R={r}", json.dumps(results["runs"][r]), flush=True)
    base = results["runs"][args.ranks[0]]["largest_peak"]
    for run in results["runs"].values():
        run["largest_peak_vs_first"] = run["largest_peak"] / base
    r_max = max(args.ranks)
    bpp = (results["runs"][r_max]["largest_peak"] - fixed) * r_max / n
    results["projection"] = {"bytes_per_parameter_per_rank_times_R": bpp, "from_R": r_max,
                             "per_gpu_gib": {name: {rr: round((fixed + bpp * np_ / rr) / GIB, 1) for rr in (8, 16, 32)}
                                             for name, np_ in PROJECTED.items()}}
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nfixed (imports) {fixed / GIB:.2f} GiB; {n / 1e9:.2f}B parameters")
    print(f"{'R':>2} {'engine':>9} {'wall s':>7}  per rank: weights / accum+engine / transient / peak GiB   largest vs R={args.ranks[0]}")
    for r, run in results["runs"].items():
        cells = "; ".join(f"{x['weights'] / GIB:.2f} / {x['accumulators_engine'] / GIB:.2f} / {x['transient'] / GIB:.2f} / "
                          f"{x['peak'] / GIB:.2f}" for x in run["ranks"])
        print(f"{r:>2} {run['engine']:>9} {run['wall_s']:>7.1f}  {cells}   {run['largest_peak_vs_first']:.2f}x")
    print("projection (GiB per GPU):", json.dumps(results["projection"]["per_gpu_gib"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
