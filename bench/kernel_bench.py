"""Merge-kernel benchmark (issue 10): marginal throughput of each method between two model depths.

Run (from the repo root, after `make setup`):
    RAY_AUTH_MODE=disabled .venv/bin/python bench/kernel_bench.py [--workdir bench/out/kernel] [--layers 1 12]
        [--shape issue|small] [--methods ...] [--repeat 1] [--memory-budget 1GiB] [--device cpu|cuda]
    RAY_AUTH_MODE=disabled .venv/bin/python bench/kernel_bench.py --profile sar   # where one merge spends its time

Builds, once per depth and reused if present (WORKDIR/<shape>-L<layers>/), a synthetic bf16 Llama-shaped base
(issue shape: hidden 2048, vocab 32000, MLP 5632, 16 heads / 4 kv heads), three RLVR-like fine-tunes with 5% of
entries changed (`synthetic.make_finetune`, density 0.05) and `synthetic.make_fisher` statistics (float32) for
each fine-tune. Then, for each depth (default 1 and 12 layers), side by side in one run:
  - `cat` of every input file to /dev/null, page cache warm (the files are read once first): the read floor;
  - `sar-dist merge --executor local`, `dtype: float32`, `out_dtype: bfloat16`, for task_arithmetic, ties
    (density 0.02), dare_ties (density 0.5, seed 0), sar with defaults (with the statistics) and sar at
    density 0.5;
  - mergekit 0.1.5's `mergekit-yaml` (default options, as bench/merge_bench.py runs it) on the very same ties
    YAML file (it holds only mergekit keys; sar-dist gets its output with `--output`).
Each run's inputs are read once (untimed) just before it. For each run: wall s, CPU s of the whole process
tree (os.wait4's rusage in a small launcher process, which counts every reaped descendant, and a psutil
sampler of the live tree), peak RSS of the largest process (the same rusage's ru_maxrss, or the sampler's
largest if higher; its per-process figures are kept too) and the bytes of
its inputs (file sizes: base + fine-tunes, plus the statistics for sar). With `--repeat N` the fastest run
per depth is used.

The figures that matter are marginal, between the two depths (start-up, planning and the embeddings, which
both depths share, cancel out): GB/s = (bytes_hi - bytes_lo) / (wall_hi - wall_lo), and CPU s per GB. The
issue's ratios (and its goals on 2 cores) are printed after the table; everything goes to
WORKDIR/results.json.

`--profile METHOD` builds (or reuses) the larger depth and runs one sar-dist merge of it under py-spy
(`.venv/bin/py-spy`, all threads, idle ones left out) or, without py-spy, in this process under cProfile (the
calling thread only: the prefetch thread is not seen), then prints the top 25 functions by cumulative and
by own time, and writes the profile next to results.json.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import os
import platform
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sar_dist.config import parse_size  # noqa: E402
from sar_dist.storage import Storage  # noqa: E402
from sar_dist.synthetic import LlamaShape, make_base, make_finetune, make_fisher  # noqa: E402

SHAPES = {
    "issue": {"hidden": 2048, "heads": 16, "kv_heads": 4, "intermediate": 5632, "vocab": 32000},
    "small": {"hidden": 512, "heads": 16, "kv_heads": 4, "intermediate": 1408, "vocab": 8000},
}
FINETUNES = ("ft1", "ft2", "ft3")
FT_DENSITY = 0.05
MAX_SHARD_BYTES = 500_000_000
BUILD_MARKER = "built.json"  # written last: its presence means the depth's inputs are complete


# name -> (merge_method, per-model parameters or None, global parameters or None, uses statistics, extra keys)
SAR_DIST_METHODS: dict[str, tuple[str, str | None, str | None, bool, str]] = {
    "task_arithmetic": ("task_arithmetic", "{weight: 1.0}", None, False, ""),
    "ties": ("ties", "{weight: 1.0, density: 0.02}", None, False, ""),
    "dare_ties": ("dare_ties", "{weight: 1.0, density: 0.5}", None, False, "seed: 0\n"),
    "sar": ("sar", None, None, True, ""),
    "sar_d0.5": ("sar", None, "{density: 0.5}", True, ""),
}
MERGEKIT = "mergekit_ties"  # mergekit-yaml on the ties YAML
ALL_METHODS = ("cat", *SAR_DIST_METHODS, MERGEKIT)
LABELS = {
    "cat": "cat inputs > /dev/null (warm)",
    "task_arithmetic": "sar-dist task_arithmetic",
    "ties": "sar-dist ties density 0.02",
    "dare_ties": "sar-dist dare_ties density 0.5",
    "sar": "sar-dist sar defaults (+statistics)",
    "sar_d0.5": "sar-dist sar density 0.5 (+statistics)",
    MERGEKIT: "mergekit 0.1.5 ties density 0.02",
}


def shape_for(name: str, layers: int) -> LlamaShape:
    return LlamaShape(layers=layers, **SHAPES[name])


def build(work: Path, shape_name: str, layers: int) -> Path:
    """The depth's base, fine-tunes and statistics under WORKDIR/<shape>-L<layers>, built once."""
    root = work / f"{shape_name}-L{layers}"
    spec = {"shape": SHAPES[shape_name], "layers": layers, "finetune_density": FT_DENSITY,
            "max_shard_bytes": MAX_SHARD_BYTES}
    marker = root / BUILD_MARKER
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return root
    shutil.rmtree(root, ignore_errors=True)
    storage = Storage()
    t = time.perf_counter()
    base = str(root / "models" / "base")
    make_base(storage, base, shape_for(shape_name, layers), seed=0, max_shard_bytes=MAX_SHARD_BYTES)
    for i, k in enumerate(FINETUNES):
        model = str(root / "models" / k)
        make_finetune(storage, base, model, seed=i + 1, density=FT_DENSITY, max_shard_bytes=MAX_SHARD_BYTES)
        make_fisher(storage, model, str(root / "fisher" / k), seed=i + 1)
    marker.write_text(json.dumps(spec))
    print(f"built the {shape_name} {layers}-layer base, fine-tunes and statistics in "
          f"{time.perf_counter() - t:.0f} s ({root})", flush=True)
    return root


def input_files(root: Path, with_stats: bool) -> list[str]:
    dirs = [root / "models" / k for k in ("base", *FINETUNES)]
    if with_stats:
        dirs += [root / "fisher" / k for k in FINETUNES]
    return sorted(str(f) for d in dirs for f in d.glob("*.safetensors"))


def write_config(root: Path, name: str) -> Path:
    """The merge YAML of ``name`` (no ``output:``: sar-dist gets ``--output``, so mergekit reads the same file)."""
    method, per_model, params, stats, extra = SAR_DIST_METHODS[name]
    lines = [f"merge_method: {method}", f"base_model: {root / 'models' / 'base'}", "models:"]
    for k in FINETUNES:
        lines.append(f"  - model: {root / 'models' / k}")
        if stats:
            lines.append(f"    fisher: {root / 'fisher' / k}")
        if per_model:
            lines.append(f"    parameters: {per_model}")
    if params:
        lines.append(f"parameters: {params}")
    lines += ["dtype: float32", "out_dtype: bfloat16"]
    cfg = root / f"{name}.yaml"
    cfg.write_text("\n".join(lines) + "\n" + extra)
    return cfg


class TreeSampler:
    """Samples the RSS and CPU time of every descendant of a process (the launcher) until stopped."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak: dict[int, tuple[str, int]] = {}
        self.peak_total = 0
        self.cpu: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            total = 0
            for p in procs:
                try:
                    with p.oneshot():
                        rss = p.memory_info().rss
                        t = p.cpu_times()
                    if p.pid not in self._names:
                        self._names[p.pid] = " ".join(p.cmdline()[:4])[-70:]
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                total += rss
                if rss > self.peak.get(p.pid, ("", 0))[1]:
                    self.peak[p.pid] = (self._names[p.pid], rss)
                self.cpu[p.pid] = t.user + t.system + t.children_user + t.children_system
            self.peak_total = max(self.peak_total, total)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def read_files(files: list[str]) -> None:
    """Reads every file once (untimed), so the measured run finds them in the page cache."""
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)


# Spawns the command from a small process and reports its rusage: a child forked from this process would
# carry this process's RSS (torch is imported here) into its ru_maxrss, which survives exec.
LAUNCHER = """
import json, os, sys, time
t = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t
with open(sys.argv[1], "w") as f:
    json.dump({"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_kib": ru.ru_maxrss}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure(name: str, cmd: list[str], read_bytes: int, env: dict[str, str]) -> dict:
    """Runs ``cmd`` to completion: wall, CPU (whole tree) and peak RSS, from wait4's rusage and a sampler."""
    print(f"--- {name}: {' '.join(cmd)}", flush=True)
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as err, tempfile.NamedTemporaryFile("r", suffix=".json") as usage_file:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, usage_file.name, *cmd], env=env,
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
        sampler = TreeSampler(proc.pid)
        proc.wait()
        sampler.stop()
        err.seek(0)
        stderr = err.read()
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed ({proc.returncode}):\n{stderr[-3000:]}")
        usage = json.loads(usage_file.read())
    wall = usage["wall_s"]
    cpu_rusage = usage["cpu_s"]  # the command and every descendant it reaped
    cpu_sampled = sum(c for pid, c in sampler.cpu.items() if pid != proc.pid)  # live processes, as last seen
    peaks = sorted((v for pid, v in sampler.peak.items() if pid != proc.pid), key=lambda x: -x[1])
    peak_rusage = usage["maxrss_kib"] * 1024  # the largest process of the reaped tree
    result = {
        "name": name,
        "wall_s": round(wall, 3),
        "cpu_s": round(max(cpu_rusage, cpu_sampled), 3),
        "cpu_s_rusage": round(cpu_rusage, 3),
        "cpu_s_sampled": round(cpu_sampled, 3),
        "read_bytes": read_bytes,
        "read_gb_s": round(read_bytes / wall / 1e9, 4),
        "peak_rss_max_process_mb": round(max(peak_rusage, peaks[0][1] if peaks else 0) / 2**20, 1),
        "peak_rss_max_process_mb_sampled": round(peaks[0][1] / 2**20, 1) if peaks else None,
        "peak_rss_total_mb_sampled": round(sampler.peak_total / 2**20, 1),
        "processes": [{"cmd": n, "peak_rss_mb": round(r / 2**20, 1)} for n, r in peaks[:6]],
        "load_avg_1m_before": round(load, 2),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("processes", "name")}), flush=True)
    return result


def sar_dist_cmd(cfg: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "sar_dist.cli", "merge", str(cfg), "--output", str(out), "--executor", "local",
            "--memory-budget", args.memory_budget, "--device", args.device]


def plan_read_bytes(cfg: Path, out: Path, args: argparse.Namespace, env: dict[str, str]) -> int | None:
    """What sar-dist's plan says it reads (every pass included), from a dry run: headers only."""
    r = subprocess.run([*sar_dist_cmd(cfg, out, args), "--dry-run", "--json"], env=env, capture_output=True,
                       text=True)
    try:
        return int(json.loads(r.stdout)["read_bytes"])
    except (ValueError, KeyError, TypeError):
        return None


def method_run(m: str, root: Path, out: Path, args: argparse.Namespace) -> tuple[list[str], list[str], Path | None]:
    """The command of method ``m`` on one depth's inputs, the files it reads, and its sar-dist config."""
    if m == "cat":
        files = input_files(root, with_stats=True)
        return ["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], files, None
    if m == MERGEKIT:
        cmd = [str(Path(sys.executable).parent / "mergekit-yaml"), str(write_config(root, "ties")), str(out),
               *args.mergekit_args]
        return cmd, input_files(root, with_stats=False), None
    cfg = write_config(root, m)
    return sar_dist_cmd(cfg, out, args), input_files(root, with_stats=SAR_DIST_METHODS[m][3]), cfg


def run_all(work: Path, roots: dict[int, Path], methods: list[str], args: argparse.Namespace,
            env: dict[str, str]) -> dict:
    """Every chosen method on both depths, ``--repeat`` times each; the two depths of a method run back to
    back, so that both see the same load on a shared machine."""
    out = work / "merged"
    depths: dict = {}
    for n, root in roots.items():
        models = sum(os.path.getsize(f) for f in input_files(root, with_stats=False))
        everything = sum(os.path.getsize(f) for f in input_files(root, with_stats=True))
        depths[f"L{n}"] = {"model_bytes": models, "statistics_bytes": everything - models, "runs": {}}
    for m in methods:
        runs: dict[int, list[dict]] = {n: [] for n in roots}
        for _ in range(args.repeat):
            for n, root in roots.items():
                cmd, files, _ = method_run(m, root, out, args)
                shutil.rmtree(out, ignore_errors=True)  # never resume: every run merges every tensor
                read_files(files)  # warm the page cache
                r = measure(f"{LABELS[m]}, {root.name}", cmd, sum(os.path.getsize(f) for f in files), env)
                if m in SAR_DIST_METHODS and not (out / "sar_merge.json").exists():
                    raise RuntimeError(f"{m}: no manifest in {out} after a successful exit")
                runs[n].append(r)
        shutil.rmtree(out, ignore_errors=True)
        for n, root in roots.items():
            entry = {"best": min(runs[n], key=lambda r: r["wall_s"]), "all_wall_s": [r["wall_s"] for r in runs[n]],
                     "all_cpu_s": [r["cpu_s"] for r in runs[n]]}
            _, _, cfg = method_run(m, root, out, args)
            if cfg is not None:
                entry["plan_read_bytes"] = plan_read_bytes(cfg, out, args, env)
            depths[f"L{n}"]["runs"][m] = entry
    return depths


def marginal(lo: dict, hi: dict) -> dict:
    """Marginal GB/s and CPU s per GB between two depths' best runs."""
    d_bytes = hi["read_bytes"] - lo["read_bytes"]
    d_wall = hi["wall_s"] - lo["wall_s"]
    d_cpu = hi["cpu_s"] - lo["cpu_s"]
    return {
        "extra_gb": round(d_bytes / 1e9, 4),
        "extra_wall_s": round(d_wall, 3),
        "extra_cpu_s": round(d_cpu, 3),
        "gb_s": round(d_bytes / d_wall / 1e9, 4) if d_wall > 0 else None,  # None: within the noise
        "cpu_s_per_gb": round(d_cpu / (d_bytes / 1e9), 3) if d_bytes > 0 else None,
    }


def ratios(marg: dict, hi_runs: dict, budget: int) -> dict:
    """The issue's ratios, each with its goal (on 2 cores) and whether this run meets it."""
    out: dict = {}

    def gbs(m: str) -> float | None:
        return marg.get(m, {}).get("gb_s")

    def wall(m: str) -> float | None:
        w = marg.get(m, {}).get("extra_wall_s")
        return w if w is not None and w > 0 else None

    def put(key: str, value: float | None, goal: str | None = None, ok: bool | None = None) -> None:
        if value is None:
            return
        out[key] = {"value": round(value, 3)}
        if goal is not None:
            out[key] |= {"goal": goal, "met": ok}

    put("cat_gb_s", gbs("cat"))
    if gbs("task_arithmetic"):
        put("task_arithmetic_gb_s", gbs("task_arithmetic"), ">= 1.5", gbs("task_arithmetic") >= 1.5)
        if gbs("cat"):
            v = gbs("cat") / gbs("task_arithmetic")
            put("task_arithmetic_slower_than_cat_x", v, "<= 5", v <= 5)
    if gbs("sar"):
        put("sar_gb_s", gbs("sar"), ">= 1.0", gbs("sar") >= 1.0)
    if wall("sar") and wall("task_arithmetic"):
        v = wall("sar") / wall("task_arithmetic")
        put("sar_time_over_task_arithmetic_time", v, "<= 2", v <= 2)
        v = hi_runs["sar"]["best"]["wall_s"] / hi_runs["task_arithmetic"]["best"]["wall_s"]
        put("sar_time_over_task_arithmetic_time_whole_run_larger_depth", v)
    if wall("sar_d0.5") and wall("sar"):
        v = wall("sar_d0.5") / wall("sar")
        put("sar_d0.5_time_over_sar_d1_time", v, "<= 1.3", v <= 1.3)
    for m in ("ties", "dare_ties"):
        if gbs(m):
            put(f"{m}_gb_s", gbs(m), ">= 0.8", gbs(m) >= 0.8)
    if wall(MERGEKIT) and wall("ties"):
        v = wall(MERGEKIT) / wall("ties")
        put("mergekit_ties_time_over_sar_dist_ties_time", v, ">= 5", v >= 5)
    limit_mb = (budget + 500_000_000) / 2**20
    for m, e in hi_runs.items():
        if m in SAR_DIST_METHODS:
            v = e["best"]["peak_rss_max_process_mb"]
            put(f"{m}_peak_rss_mb_larger_depth", v, f"<= budget + 0.5 GB = {limit_mb:.0f} MB", v <= limit_mb)
    return out


def print_table(depths: dict, marg: dict, rat: dict, methods: list[str]) -> None:
    names = list(depths)
    head = f"{'run':<40}" + "".join(f"{'wall s':>9}{'cpu s':>9}{'RSS MB':>8}{'GB':>7}  " for _ in names)
    print("\n" + " " * 40 + "".join(f"{n:<42}" for n in names) + "marginal")
    print(head + f"{'GB/s':>8}{'cpu s/GB':>10}")
    for m in methods:
        row = f"{LABELS[m]:<40}"
        for n in names:
            b = depths[n]["runs"][m]["best"]
            row += (f"{b['wall_s']:>9.2f}{b['cpu_s']:>9.2f}{b['peak_rss_max_process_mb']:>8.0f}"
                    f"{b['read_bytes'] / 1e9:>7.3f}  ")
        g, c = marg[m]["gb_s"], marg[m]["cpu_s_per_gb"]
        row += f"{g:>8.3f}" if g is not None else f"{'noise':>8}"
        row += f"{c:>10.2f}" if c is not None else f"{'-':>10}"
        print(row)
    print()
    for k, v in rat.items():
        goal = f"   goal {v['goal']}: {'met' if v['met'] else 'NOT met'}" if "goal" in v else ""
        print(f"{k:<62}{v['value']:>10.3f}{goal}")


def machine_info() -> dict:
    import torch

    def version(pkg: str) -> str | None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as v

        try:
            return v(pkg)
        except PackageNotFoundError:
            return None

    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "mergekit": version("mergekit"),
            "sar_dist_commit": git.stdout.strip() or None, "load_avg": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


# ---- --profile ---------------------------------------------------------------------------------------------

_LINE = re.compile(r":\d+\)$")


def top_from_folded(text: str, rate: int, n: int = 25) -> str:
    """Top functions by cumulative and own samples, and top lines by own samples, from py-spy's raw
    (folded) output: one ``frame;frame;... count`` per line, frames ``function (file:line)``."""
    own: collections.Counter[str] = collections.Counter()
    own_line: collections.Counter[str] = collections.Counter()
    cum: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        functions = [_LINE.sub(")", f) for f in frames]
        c = int(count)
        total += c
        own[functions[-1]] += c
        own_line[frames[-1]] += c
        for f in set(functions):
            cum[f] += c
    lines = [f"{total} samples at {rate} Hz = {total / rate:.1f} s of active threads (idle threads left out)"]
    for title, counter in (("functions by cumulative", cum), ("functions by own", own), ("lines by own", own_line)):
        lines.append(f"\ntop {n} {title} time:")
        lines.append(f"{'s':>8}{'%':>7}  function (file)")
        for f, c in counter.most_common(n):
            lines.append(f"{c / rate:>8.2f}{100 * c / max(total, 1):>7.1f}  {f}")
    return "\n".join(lines)


def profile(work: Path, root: Path, method: str, args: argparse.Namespace, env: dict[str, str]) -> None:
    cfg = write_config(root, method)
    out = work / "merged-profile"
    shutil.rmtree(out, ignore_errors=True)
    read_files(input_files(root, with_stats=SAR_DIST_METHODS[method][3]))
    py_spy = Path(sys.executable).parent / "py-spy"
    use_py_spy = args.profiler == "py-spy" or (args.profiler == "auto" and py_spy.exists())
    if use_py_spy:
        folded = work / f"profile-{method}-{root.name}.folded"
        rate = 100
        cmd = [str(py_spy), "record", "--format", "raw", "--rate", str(rate), "--output", str(folded),
               *(["--native"] if args.native else []), "--", *sar_dist_cmd(cfg, out, args)]
        print("--- " + " ".join(cmd), flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        print(f"wall {time.perf_counter() - t:.2f} s (under py-spy)")
        report = top_from_folded(folded.read_text(), rate)
    else:
        from sar_dist.cli import main as cli_main

        os.environ.update(env)
        argv = sar_dist_cmd(cfg, out, args)[3:]
        print("--- in process under cProfile (this thread only): sar-dist " + " ".join(argv), flush=True)
        prof = cProfile.Profile()
        t = time.perf_counter()
        rc = prof.runcall(cli_main, argv)
        print(f"wall {time.perf_counter() - t:.2f} s (under cProfile), exit {rc}")
        prof.dump_stats(str(work / f"profile-{method}-{root.name}.pstats"))
        buf = io.StringIO()
        for key in ("cumulative", "tottime"):
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(25)
        report = buf.getvalue()
    shutil.rmtree(out, ignore_errors=True)
    (work / f"profile-{method}-{root.name}.txt").write_text(report)
    print(report)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=str(REPO / "bench" / "out" / "kernel"))
    p.add_argument("--layers", type=int, nargs=2, default=[1, 12], metavar=("LO", "HI"))
    p.add_argument("--shape", choices=tuple(SHAPES), default="issue",
                   help="issue: hidden 2048, vocab 32000, MLP 5632; small: hidden 512, vocab 8000, MLP 1408")
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS))
    p.add_argument("--repeat", type=int, default=1, help="runs per method and depth; the fastest is used")
    p.add_argument("--memory-budget", default="1GiB", help="passed to sar-dist merge")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="passed to sar-dist merge")
    p.add_argument("--mergekit-args", nargs="*", default=[], help="extra mergekit-yaml options (default none)")
    p.add_argument("--profile", choices=tuple(SAR_DIST_METHODS), metavar="METHOD",
                   help=f"profile one merge of the larger depth instead ({', '.join(SAR_DIST_METHODS)})")
    p.add_argument("--profiler", choices=("auto", "py-spy", "cprofile"), default="auto")
    p.add_argument("--native", action="store_true", help="with py-spy: native (C/C++) frames too")
    args = p.parse_args()
    lo, hi = sorted(args.layers)
    if lo == hi:
        p.error("--layers: two different depths")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "RAY_DISABLE_USAGE_STATS": os.environ.get("RAY_DISABLE_USAGE_STATS", "1")}
    if args.profile:
        profile(work, build(work, args.shape, hi), args.profile, args, env)
        return 0
    methods = [m for m in ALL_METHODS if m in args.methods]  # a fixed order
    roots = {n: build(work, args.shape, n) for n in (lo, hi)}
    results: dict = {"machine": machine_info(),
                     "settings": {"shape": args.shape, **SHAPES[args.shape], "layers": [lo, hi],
                                  "finetunes": len(FINETUNES), "finetune_density": FT_DENSITY,
                                  "memory_budget": args.memory_budget, "device": args.device,
                                  "repeat": args.repeat, "executor": "local", "dtype": "float32",
                                  "out_dtype": "bfloat16", "mergekit_args": args.mergekit_args,
                                  "parameters": {n: shape_for(args.shape, n).num_parameters for n in (lo, hi)}},
                     "configs": {m: write_config(roots[hi], m).read_text() for m in SAR_DIST_METHODS}}
    depths = run_all(work, roots, methods, args, env)
    marg = {m: marginal(depths[f"L{lo}"]["runs"][m]["best"], depths[f"L{hi}"]["runs"][m]["best"]) for m in methods}
    rat = ratios(marg, depths[f"L{hi}"]["runs"], parse_size(args.memory_budget, "--memory-budget"))
    results |= {"depths": depths, "marginal": marg, "ratios": rat}
    results["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print_table(depths, marg, rat, methods)
    print(f"\nwrote {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
