"""Merge-kernel micro benchmark: one tensor held in memory, merged by ``execute.shard.merge_unit``.

Run (from the repo root, after `make setup`):
    .venv/bin/python bench/unit_bench.py [--methods ...] [--block-numel 65536 262144] [--repeat 3]

No files, no reads, no writes, no hashing: the merge kernels alone, on the tensor shape that dominates a
Llama-shaped model (an MLP projection, 2048 x 5632, bf16 base and three fine-tunes with 5% of entries
changed, float32 statistics for sar; `dtype: float32`, `out_dtype: bfloat16`), the same inputs for every
method and block size in one run. Each figure is the fastest of `--repeat` merges; GB/s counts the bytes
of the tensor's inputs (base, fine-tunes, and statistics for sar). The output's sha256 is printed, so a
kernel change that keeps the bits shows the same digest. `--block-numel` runs each size given as the CPU
block size (``execute.blocks.CPU_BLOCK_NUMEL``) side by side.

bench/kernel_bench.py measures the whole merge stage (reads, writes, hashing, planning) between two model
depths; this one isolates where a kernel change lands.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sar_dist.execute import blocks  # noqa: E402
from sar_dist.execute.shard import merge_unit  # noqa: E402
from sar_dist.merge.methods.sar import SarParams  # noqa: E402
from sar_dist.merge.methods.task_arithmetic import TaskArithmeticParams, TiesParams  # noqa: E402
from sar_dist.merge.methods.task_arithmetic_presets import DareTiesParams  # noqa: E402
from sar_dist.merge.registry import get_method  # noqa: E402

ROWS, COLS, MODELS, CHANGED = 2048, 5632, 3, 0.05
WEIGHTS = (1.0,) * MODELS

# name -> (registered method, params, uses statistics); the kernel bench's settings
CASES = {
    "task_arithmetic": ("task_arithmetic", TaskArithmeticParams(weights=WEIGHTS), False),
    "ties": ("ties", TiesParams(weights=WEIGHTS, densities=(0.02,) * MODELS), False),
    "dare_ties": ("dare_ties", DareTiesParams(weights=WEIGHTS, densities=(0.5,) * MODELS), False),
    "sar": ("sar", SarParams(weights=WEIGHTS), True),
    "sar_d0.5": ("sar", SarParams(weights=WEIGHTS, density=0.5), True),
}


def inputs() -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A bf16 base, RLVR-like fine-tunes (5% of entries changed) and positive float32 statistics."""
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(ROWS, COLS, generator=g) * 0.02).bfloat16()
    models = []
    for _ in range(MODELS):
        changed = torch.rand(ROWS, COLS, generator=g) < CHANGED
        models.append((base.float() + changed * torch.randn(ROWS, COLS, generator=g) * 0.01).bfloat16())
    fisher = [torch.rand(ROWS, COLS, generator=g) for _ in range(MODELS)]
    return base, models, fisher


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", choices=tuple(CASES), default=list(CASES))
    p.add_argument("--block-numel", type=int, nargs="+", default=[blocks.CPU_BLOCK_NUMEL])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    base, models, fisher = inputs()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); one {ROWS} x {COLS} tensor, {MODELS} models", flush=True)
    print(f"{'method':16s} {'block':>8s} {'best ms':>9s} {'GB/s':>6s} {'CPU s':>6s}  sha256", flush=True)
    for name in args.methods:
        registered, params, stats = CASES[name]
        method = get_method(registered)
        job = types.SimpleNamespace(params=params, compute_dtype="F32", out_dtype="BF16", name="bench.weight",
                                    shape=(ROWS, COLS), base=True, inputs=(None,) * MODELS,
                                    fisher_scale=(1.0,) * MODELS if stats else ())
        raw = [base, *models, *(fisher if stats else [])]
        nbytes = sum(t.numel() * t.element_size() for t in raw)
        for numel in args.block_numel:
            blocks.CPU_BLOCK_NUMEL = numel
            best, cpu, out = float("inf"), 0.0, None
            for _ in range(args.repeat):
                t0, c0 = time.perf_counter(), time.process_time()
                out = merge_unit(method, (job, None), list(raw), 0, "cpu")
                wall = time.perf_counter() - t0
                if wall < best:
                    best, cpu = wall, time.process_time() - c0
            digest = hashlib.sha256(out.view(torch.int16).numpy().tobytes()).hexdigest()[:16]
            print(f"{name:16s} {numel:8d} {best * 1e3:9.1f} {nbytes / best / 1e9:6.2f} {cpu:6.2f}  {digest}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
