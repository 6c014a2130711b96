"""Merge benchmark: sar-dist against a plain read of the inputs and against mergekit.

Run (from the repo root, after `make setup`):
    .venv/bin/python bench/merge_bench.py [--workdir bench/out] [--layers 28]

Builds a synthetic Llama-shaped model of about 0.5B parameters (bf16, ~1 GB) and three
RLVR-like fine-tunes, then measures side by side, in one run:
  1. `cat` of every input file to /dev/null (warm page cache): the read floor;
  2. `sar-dist merge` task_arithmetic, local executor;
  3. `sar-dist merge` ties, default (Ray) executor;
  4. `mergekit-yaml` 0.1.5 on the same ties YAML.
For each: wall time, CPU time (all processes), bytes read, GB/s, and the peak RSS of
every process (sampled every 50 ms over the whole process tree), then the ratios.
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
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sar_dist.storage import Storage  # noqa: E402
from sar_dist.synthetic import LlamaShape, make_base, make_finetune  # noqa: E402


def build(workdir: Path, shape: LlamaShape) -> dict[str, Path]:
    storage = Storage()
    paths = {k: workdir / "models" / k for k in ("base", "ft1", "ft2", "ft3")}
    if not (paths["ft3"] / "config.json").exists():
        t = time.time()
        make_base(storage, str(paths["base"]), shape, seed=0, max_shard_bytes=500_000_000)
        for i, k in enumerate(("ft1", "ft2", "ft3")):
            make_finetune(storage, str(paths["base"]), str(paths[k]), seed=i + 1, density=0.01,
                          max_shard_bytes=500_000_000)
        print(f"built models in {time.time() - t:.0f}s", flush=True)
    return paths


class TreeSampler:
    """Samples RSS of a process and all its descendants until stopped."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_per_process: dict[int, tuple[str, int]] = {}
        self.peak_total = 0
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    t = p.cpu_times()
                    name = " ".join(p.cmdline()[:3])[-60:]
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                total += rss
                if rss > self.peak_per_process.get(p.pid, ("", 0))[1]:
                    self.peak_per_process[p.pid] = (name, rss)
                self.cpu[p.pid] = t.user + t.system
            self.peak_total = max(self.peak_total, total)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(name: str, cmd: list[str], read_bytes: int, env: dict | None = None) -> dict:
    print(f"--- {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid)
    _, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{stderr[-3000:]}")
    peaks = sorted(sampler.peak_per_process.values(), key=lambda x: -x[1])
    result = {
        "name": name,
        "wall_s": round(wall, 2),
        "cpu_s": round(sum(sampler.cpu.values()), 2),
        "read_bytes": read_bytes,
        "read_gb_s": round(read_bytes / wall / 1e9, 3),
        "peak_rss_max_process_mb": round(peaks[0][1] / 2**20, 1) if peaks else None,
        "peak_rss_total_mb": round(sampler.peak_total / 2**20, 1),
        "processes": [{"cmd": n, "peak_rss_mb": round(r / 2**20, 1)} for n, r in peaks[:8]],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "processes"}), flush=True)
    return result


def drop_output(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default=str(REPO / "bench" / "out"))
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--memory-budget", default="256MiB")
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--ties-densities", type=float, nargs="+", default=[0.5, 0.005],
                   help="0.5 keeps every RLVR update (1%% of entries); 0.005 needs the exact threshold")
    args = p.parse_args()
    work = Path(args.workdir).resolve()
    shape = LlamaShape(hidden=1024, layers=args.layers, heads=16, kv_heads=4, intermediate=4096, vocab=32000)
    paths = build(work, shape)
    files = sorted(str(f) for k in ("base", "ft1", "ft2", "ft3") for f in paths[k].glob("*.safetensors"))
    read_bytes = sum(os.path.getsize(f) for f in files)
    py = sys.executable
    bindir = Path(py).parent
    results = {"machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                           "platform": platform.platform(), "python": platform.python_version()},
               "model": {"parameters": shape.num_parameters, "input_bytes": read_bytes, "num_inputs": 4}}
    runs = []
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    runs.append(measure("cat inputs > /dev/null (warm)", ["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], read_bytes))

    def config(method: str, out: Path, params: str) -> Path:
        cfg = work / f"{method}.yaml"
        cfg.write_text(
            f"merge_method: {method}\nbase_model: {paths['base']}\nmodels:\n"
            + "".join(f"  - model: {paths[k]}\n    parameters: {params}\n" for k in ("ft1", "ft2", "ft3"))
            + f"dtype: float32\nout_dtype: bfloat16\noutput: {out}\n"
        )
        return cfg

    ta_out = work / "merged-ta"
    drop_output(ta_out)
    runs.append(measure("sar-dist task_arithmetic (local executor)",
                        [py, "-m", "sar_dist.cli", "merge", str(config("task_arithmetic", ta_out, "{weight: 1.0}")),
                         "--executor", "local", "--memory-budget", args.memory_budget], read_bytes))
    for density in args.ties_densities:
        tag = f"ties-d{density}"
        ties_cfg = config("ties", work / f"merged-{tag}", f"{{weight: 1.0, density: {density}}}")
        ties_cfg = ties_cfg.rename(work / f"{tag}.yaml")
        drop_output(work / f"merged-{tag}")
        runs.append(measure(f"sar-dist ties density {density} (ray executor, 2 CPUs)",
                            [py, "-m", "sar_dist.cli", "merge", str(ties_cfg), "--memory-budget", args.memory_budget],
                            read_bytes, env={"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}))
        if not args.skip_mergekit:
            mk_out = work / f"merged-{tag}-mergekit"
            drop_output(mk_out)
            mk_cfg = work / f"{tag}-mergekit.yaml"
            mk_cfg.write_text("".join(line for line in ties_cfg.read_text().splitlines(True)
                                      if not line.startswith("output:")))
            runs.append(measure(f"mergekit 0.1.5 ties density {density} (mergekit-yaml, CPU)",
                                [str(bindir / "mergekit-yaml"), str(mk_cfg), str(mk_out)], read_bytes))
    results["runs"] = runs
    by = {r["name"].split(" (")[0]: r for r in runs}
    cat = by["cat inputs > /dev/null"]["wall_s"]
    ratios = {"task_arithmetic_wall_vs_cat": round(by["sar-dist task_arithmetic"]["wall_s"] / cat, 2)}
    for density in args.ties_densities:
        mk, sd = by.get(f"mergekit 0.1.5 ties density {density}"), by[f"sar-dist ties density {density}"]
        if mk:
            ratios[f"ties_d{density}_mergekit_wall_over_sar_dist"] = round(mk["wall_s"] / sd["wall_s"], 2)
            ratios[f"ties_d{density}_sar_dist_peak_max_process_over_mergekit"] = round(
                sd["peak_rss_max_process_mb"] / mk["peak_rss_max_process_mb"], 2)
    results["ratios"] = ratios
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(ratios, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
