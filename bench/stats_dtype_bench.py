"""What bfloat16 Fisher statistics (``stats_dtype: bfloat16``) change in a SAR merge, and what they save.

Builds a Llama-shaped base and K RLVR-like fine-tunes (sparse updates over overlapping regions, so
some entries are updated by several models), runs the real Fisher stage on each (float32, parts kept),
reruns it as bfloat16 over the same parts (only the reduce runs), then merges with SAR (default
parameters: sensitivity arbitration, ``fisher_norm: l2``, density 1) once with each set of statistics,
in float32 with a float32 output. Reports:

- arbitration: entries updated by >= 2 models; of the sign conflicts among them, the share whose
  winner (largest F_k t_k^2) differs; of all of them, the share whose merged value differs;
- the largest change in the merged output (absolute, relative to the largest |update| of that
  tensor, and over the entries whose winner did not change), and how many entries differ once the output is cast to bf16 (what ``out_dtype: bfloat16``
  writes);
- bytes the merge plan reads (all inputs, and the statistics alone) with float32 vs bf16 statistics.

Run:
    RAY_AUTH_MODE=disabled .venv/bin/python bench/stats_dtype_bench.py [--hidden 256] [--examples 32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sar_dist.checkpoint.index import open_checkpoint  # noqa: E402
from sar_dist.checkpoint.reader import read_tensor  # noqa: E402
from sar_dist.config import MergeJob  # noqa: E402
from sar_dist.execute.run import execute, prepare  # noqa: E402
from sar_dist.fisher.config import FisherJob  # noqa: E402
from sar_dist.fisher.plan import build_fisher_plan  # noqa: E402
from sar_dist.fisher.run import run_fisher  # noqa: E402
from sar_dist.plan.planner import build_plan  # noqa: E402
from sar_dist.storage import Storage  # noqa: E402
from sar_dist.synthetic import LlamaShape, make_base, make_finetune  # noqa: E402

REGIONS = [(0.0, 0.6), (0.4, 1.0), (0.0, 1.0), (0.2, 0.8)]


def load(url: str, stem: str = "model") -> dict[str, torch.Tensor]:
    storage = Storage()
    index = open_checkpoint(storage, url, stem=stem)
    return {n: read_tensor(storage, r) for n, r in index.tensors.items()}


def calibration(path: Path, vocab: int, num: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    with path.open("w") as f:
        for _ in range(num):
            ids = torch.randint(3, vocab, (24,), generator=g).tolist()
            f.write(json.dumps({"input_ids": ids, "labels": [-100] * 8 + ids[8:]}) + "\n")
    return str(path)


def fisher_pair(model: str, data: str, root: Path, name: str) -> tuple[str, str, float]:
    """float32 statistics, then bf16 over the same parts (``--force``: reduce only)."""
    f32, bf16 = root / f"{name}-f32", root / f"{name}-bf16"
    run_fisher(build_fisher_plan(FisherJob.from_dict({"model": model, "data": data, "output": str(f32),
                                                      "keep_parts": True})))
    shutil.copytree(f32, bf16)
    t0 = time.perf_counter()
    run_fisher(build_fisher_plan(FisherJob.from_dict({"model": model, "data": data, "output": str(bf16),
                                                      "stats_dtype": "bfloat16"})), force=True)
    return str(f32), str(bf16), time.perf_counter() - t0


def sar_job(base: str, models: list[str], stats: list[str], out: str) -> MergeJob:
    return MergeJob.from_dict({"merge_method": "sar", "base_model": base, "output": out, "dtype": "float32",
                               "out_dtype": "float32",
                               "models": [{"model": m, "fisher": s} for m, s in zip(models, stats, strict=True)]})


def scaled(stats_url: str) -> dict[str, torch.Tensor]:
    """F = stored / num_examples / l2_norm_mean, as the merge computes it (fisher_norm: l2)."""
    m = json.loads(Path(stats_url, "fisher.json").read_text())
    c = 1.0 / m["num_examples"] / m["l2_norm_mean"]
    return {n: t.float() * c for n, t in load(stats_url, "fisher").items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--models", type=int, default=3, choices=range(2, 5))
    ap.add_argument("--density", type=float, default=0.05, help="fraction of entries each fine-tune updates")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--out", default="bench/out/stats_dtype.json")
    args = ap.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=10**8, include_dashboard=False, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="stats-dtype-bench-"))
    try:
        storage = Storage()
        shape = LlamaShape(hidden=args.hidden, layers=args.layers, heads=4, kv_heads=2, intermediate=2 * args.hidden,
                           vocab=512)
        base = str(root / "base")
        make_base(storage, base, shape, seed=0)
        models = []
        for k in range(args.models):
            models.append(str(root / f"ft{k}"))
            make_finetune(storage, base, models[-1], seed=k + 1, density=args.density, region=REGIONS[k])
        f32, bf16, reduce_s = [], [], []
        for k, m in enumerate(models):
            a, b, s = fisher_pair(m, calibration(root / f"data{k}.jsonl", shape.vocab, args.examples, k), root, f"ft{k}")
            f32.append(a)
            bf16.append(b)
            reduce_s.append(s)
        plans = {kind: build_plan(sar_job(base, models, st, str(root / f"merge-{kind}")))
                 for kind, st in (("f32", f32), ("bf16", bf16))}
        read = {kind: {"all_bytes": sum(t.read_bytes for t in p.tasks),
                       "stats_bytes": sum(r.info.nbytes for t in p.tasks for j in t.tensors for r in j.fisher)}
                for kind, p in plans.items()}
        for p in plans.values():
            execute(prepare(p), executor="local")
        out = {kind: load(str(root / f"merge-{kind}")) for kind in plans}
        b = load(base)
        ms = [load(m) for m in models]
        fs = {"f32": [scaled(s) for s in f32], "bf16": [scaled(s) for s in bf16]}
        totals = dict(entries=0, overlap=0, conflicts=0, winner_changed=0, overlap_value_changed=0,
                      value_changed=0, value_changed_bf16_out=0)
        max_abs, max_rel, worst, max_same_winner = 0.0, 0.0, "", 0.0
        for name, base_t in b.items():
            if not base_t.is_floating_point():
                continue
            t = torch.stack([m[name].float() - base_t.float() for m in ms]).reshape(len(ms), -1)
            upd = t != 0
            over = upd.sum(0) >= 2
            pos, neg = ((t > 0) & upd).any(0), ((t < 0) & upd).any(0)
            conflict = over & pos & neg
            winners = {}
            for kind in fs:
                f = torch.stack([x[name].float() for x in fs[kind]]).reshape(len(ms), -1)
                s = torch.where(upd, f * t.square(), torch.full_like(t, -1.0))
                winners[kind] = s.argmax(0)  # first index among equal maxima, as the method breaks ties
            o32, o16 = out["f32"][name].reshape(-1), out["bf16"][name].reshape(-1)
            diff = (o16 - o32).abs()
            totals["entries"] += base_t.numel()
            totals["overlap"] += int(over.sum())
            totals["conflicts"] += int(conflict.sum())
            totals["winner_changed"] += int((conflict & (winners["f32"] != winners["bf16"])).sum())
            totals["overlap_value_changed"] += int((over & (diff > 0)).sum())
            totals["value_changed"] += int((diff > 0).sum())
            totals["value_changed_bf16_out"] += int((o16.bfloat16() != o32.bfloat16()).sum())
            flipped = conflict & (winners["f32"] != winners["bf16"])
            max_same_winner = max(max_same_winner, float(diff[~flipped].max()))
            d = float(diff.max())
            scale = float(t.abs().max())
            if d > max_abs:
                max_abs, worst = d, name
            if scale > 0:
                max_rel = max(max_rel, d / scale)
        result = {
            "config": vars(args), "params": sum(x.numel() for x in b.values()), "totals": totals,
            "share_conflicts_winner_changed": totals["winner_changed"] / max(totals["conflicts"], 1),
            "share_overlap_value_changed": totals["overlap_value_changed"] / max(totals["overlap"], 1),
            "max_abs_change": max_abs, "max_abs_change_tensor": worst,
            "max_change_rel_to_max_update": max_rel, "max_abs_change_where_winner_kept": max_same_winner,
            "read": read,
            "bf16_reduce_only_rerun_s": [round(s, 2) for s in reduce_s],
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
