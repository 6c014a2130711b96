"""A SAR merge of 4 x Llama-3-70B with Fisher statistics, planned on paper.

Run (from the repo root, after `make setup`; a few seconds, no real disk space):
    .venv/bin/python bench/plan_70b.py [--workdir bench/out/plan70b] [--budget 8GiB]
        [--nodes 1 4 16] [--node-gbps 2.0]

Writes a Llama-3-70B-shaped base, 4 fine-tunes and their Fisher statistics as SPARSE files: real
safetensors headers and sizes, holes for the data (the files occupy almost no disk). Then plans
the merge exactly as `sar-dist merge --dry-run` does (headers only, plus the few sampled blocks
that match each model to its statistics) and prints, per output shard task, the bytes read and
written and the planned peak memory under the budget, and a wall-time estimate for N nodes at a
given per-node storage bandwidth, and a compute-bound one from a measured merge rate:
    I/O:     max(total bytes moved / (N * bandwidth), largest task's bytes / bandwidth)
    compute: max(total bytes read / (N * (vCPUs / 2) * rate), largest task's read bytes / rate)
where ``rate`` is the marginal GB/s of input that one merge task reached on 2 vCPU
(`bench/kernel_bench.py`, read from its results.json, or ``--rate-gb-s``), assumed to scale with
the node's vCPUs in pairs (one task per 2 vCPUs). The wall is the larger of the two. These are
estimates from the plan and one small measured rate, not a measurement of a 70B merge.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sar_dist.checkpoint.format import build_header, order_for_writing, pack_in_order  # noqa: E402
from sar_dist.checkpoint.index import content_fingerprint, open_checkpoint  # noqa: E402
from sar_dist.config import MergeJob, parse_size  # noqa: E402
from sar_dist.fisher.plan import FORMAT_VERSION, MANIFEST  # noqa: E402
from sar_dist.plan.planner import build_plan  # noqa: E402
from sar_dist.storage import Storage  # noqa: E402
from sar_dist.synthetic import LlamaShape  # noqa: E402

LLAMA3_70B = LlamaShape(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=128256)


def write_sparse_checkpoint(root: Path, shapes: dict[str, tuple[int, ...]], dtype: str, stem: str,
                            shard_bytes: int = 5 * 10**9) -> None:
    """Headers for real, data as holes: each shard is its header, then truncate() to full size."""
    itemsize = {"BF16": 2, "F32": 4}[dtype]
    root.mkdir(parents=True, exist_ok=True)
    shards = pack_in_order([(n, math.prod(s) * itemsize) for n, s in shapes.items()], shard_bytes)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = order_for_writing([(n, dtype, shapes[n]) for n in names])
        header, spans = build_header(entries, {"format": "pt"})
        with open(root / file, "wb") as f:
            f.write(header)
            f.truncate(len(header) + sum(n for _, _, n in spans))
        weight_map.update({n: file for n in names})
    total = sum(math.prod(s) for s in shapes.values()) * itemsize
    (root / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=str(REPO / "bench" / "out" / "plan70b"))
    p.add_argument("--budget", default="8GiB")
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--node-gbps", type=float, default=2.0, help="storage bandwidth per node, GB/s")
    p.add_argument("--node-vcpus", type=int, default=32, help="vCPUs per node (one merge task per 2)")
    p.add_argument("--rate-gb-s", type=float, default=None,
                   help="one task's merge rate on 2 vCPU, GB/s of input (default: sar's marginal rate in --kernel-results)")
    p.add_argument("--kernel-results", default=str(REPO / "bench" / "out" / "kernel" / "results.json"))
    args = p.parse_args()
    root = Path(args.workdir)
    shapes = LLAMA3_70B.tensor_shapes()
    config = LLAMA3_70B.config_json(__import__("torch").bfloat16)
    storage = Storage()
    names = ["base", *[f"rl-{i}" for i in range(args.models)]]
    for name in names:
        if not (root / name / "config.json").exists():
            write_sparse_checkpoint(root / name, shapes, "BF16", "model")
            (root / name / "config.json").write_text(json.dumps(config))
    for name in names[1:]:
        stats = root / "fisher" / name
        if not (stats / MANIFEST).exists():
            write_sparse_checkpoint(stats, shapes, "F32", "fisher")
            index = open_checkpoint(storage, str(root / name))
            (stats / MANIFEST).write_text(json.dumps({
                "format_version": FORMAT_VERSION, "num_examples": 1024, "l2_norm_mean": 1.0,
                "model": {"url": str(root / name), "fingerprint": index.fingerprint(),
                          "content_fingerprint": content_fingerprint(storage, index)}}))
    job = MergeJob.from_dict({
        "merge_method": "sar", "base_model": str(root / "base"), "dtype": "float32", "out_dtype": "bfloat16",
        "models": [{"model": str(root / n), "fisher": str(root / "fisher" / n)} for n in names[1:]],
        "output": str(root / "merged"),
    }, where="plan_70b")
    plan = build_plan(job, memory_budget=parse_size(args.budget))
    s = plan.summary()
    on_disk = sum(os.stat(f).st_blocks * 512 for f in root.rglob("*") if f.is_file())
    params = LLAMA3_70B.num_parameters
    print(f"model: Llama-3-70B shape, {params / 1e9:.2f}B parameters; {args.models} fine-tunes + base, "
          f"Fisher statistics per fine-tune (F32); files on disk: {on_disk / 1e6:.1f} MB (sparse)")
    print(f"plan: {s['num_shards']} shard tasks, {s['num_tensors']} tensors, read {s['read_bytes'] / 1e9:.1f} GB, "
          f"write {s['write_bytes'] / 1e9:.1f} GB, budget {args.budget}, largest task peak "
          f"{s['peak_task_bytes'] / 2**30:.2f} GiB, {sum(t['chunked_tensors'] for t in s['shards'])} tensors in row chunks")
    print("\n| task | tensors | read GB | write GB | planned peak GiB | chunked tensors |\n|---|---:|---:|---:|---:|---:|")
    for t in s["shards"]:
        print(f"| {t['file']} | {t['tensors']} | {t['read_bytes'] / 1e9:.1f} | {t['write_bytes'] / 1e9:.2f} | "
              f"{t['estimated_peak_bytes'] / 2**30:.2f} | {t['chunked_tensors']} |")
    moved = s["read_bytes"] + s["write_bytes"]
    biggest = max(t["read_bytes"] + t["write_bytes"] for t in s["shards"])
    bw = args.node_gbps * 1e9
    rate = args.rate_gb_s
    if rate is None and Path(args.kernel_results).exists():
        rate = json.loads(Path(args.kernel_results).read_text())["marginal"]["sar"]["gb_s"]
    biggest_read = max(t["read_bytes"] for t in s["shards"])
    print(f"\n| nodes | I/O-bound wall at {args.node_gbps:g} GB/s per node | compute-bound wall at "
          f"{rate if rate else float('nan'):.3g} GB/s per 2 vCPU, {args.node_vcpus} vCPUs per node | estimate |"
          f"\n|---:|---:|---:|---:|")
    for n in args.nodes:
        io = max(moved / (n * bw), biggest / bw)
        if rate:
            per_node = max(1, args.node_vcpus // 2) * rate * 1e9
            compute = max(s["read_bytes"] / (n * per_node), biggest_read / (rate * 1e9))
            print(f"| {n} | {io / 60:.1f} min | {compute / 60:.1f} min | {max(io, compute) / 60:.1f} min |")
        else:
            print(f"| {n} | {io / 60:.1f} min | (no measured rate) | {io / 60:.1f} min |")
    for w in s["warnings"][:5]:
        print("warning:", w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
