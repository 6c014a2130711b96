"""Fisher benchmark: `sar-dist fisher` against a plain single-process PyTorch loop.

Run (from the repo root, after `make setup`):
    RAY_AUTH_MODE=disabled .venv/bin/python bench/fisher_bench.py [--workdir bench/out/fisher]

Builds a synthetic Llama-shaped model (about 120M parameters, bf16 on disk, float32 in
compute) and pre-tokenized calibration data, then measures side by side, in one run:
  1. a plain PyTorch loop in one process: load the whole model, then per example forward,
     backward, add grad**2 (the baseline: what the statistics cost without sharding);
  2. `sar-dist fisher` with 1 group x 1 rank (plain autograd: nothing to shard);
  3. the same forced onto DeepSpeed ZeRO-3 (a `deepspeed` config given);
  4. `sar-dist fisher` with 1 group x 2 ranks (ZeRO-3 shards the model over both);
  5. 1x1 and 1x2 ZeRO-3 again with live-parameter and sub-group sizes scaled to the model.
For each: wall time end to end, the compute phase (examples only; sar-dist records it per
part in fisher.json), tokens/s over the compute phase, and the peak RSS of each process
that holds the model (the baseline process, or each rank). The statistics of every run are
compared with the baseline's (largest error relative to each tensor's largest entry).
Results go to WORKDIR/results.json; bench/README.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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

SHAPE = LlamaShape(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=32000)


def build(workdir: Path, num_examples: int, seq: int) -> tuple[Path, Path]:
    model = workdir / "model"
    if not (model / "config.json").exists():
        make_base(Storage(), str(model), SHAPE, seed=0, max_shard_bytes=200_000_000)
    data = workdir / f"data-{num_examples}x{seq}.jsonl"
    if not data.exists():
        g = torch.Generator().manual_seed(0)
        with data.open("w") as f:
            for _ in range(num_examples):
                ids = torch.randint(3, SHAPE.vocab, (seq,), generator=g).tolist()
                prompt = seq // 4
                f.write(json.dumps({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}) + "\n")
    return model, data


def baseline(model_dir: str, data: str, out: str, threads: int) -> None:
    """The plain loop (run in its own process): whole model in memory, one example at a time."""
    import transformers
    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    config = json.loads(Path(model_dir, "config.json").read_text())
    config_obj = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    model = transformers.AutoModelForCausalLM.from_config(config_obj, dtype=torch.float32)
    state = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        state.update({k: v.float() for k, v in load_file(str(f)).items()})
    model.load_state_dict(state, strict=False)
    del state
    model.eval()
    records = [json.loads(line) for line in Path(data).read_text().splitlines()]
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    t1 = time.perf_counter()
    tokens = 0
    for rec in records:
        model.zero_grad(set_to_none=True)
        ids = torch.tensor([rec["input_ids"]])
        labels = torch.tensor(rec["labels"][1:])
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), dim=-1)
        keep = labels != -100
        logp[keep].gather(1, labels[keep].unsqueeze(1)).sum().backward()
        for n, p in model.named_parameters():
            acc[n].add_(p.grad.square())
        tokens += len(rec["input_ids"])
    t2 = time.perf_counter()
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(acc, str(Path(out, "stats.safetensors")))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out, "result.json").write_text(json.dumps({"wall_s": t2 - t0, "compute_s": t2 - t1, "tokens": tokens,
                                                    "peak_rss_bytes": [rss]}))


def compare(stats_dir: Path, baseline_file: Path) -> float:
    from safetensors.torch import load_file

    ref = load_file(str(baseline_file))
    got = {}
    for f in sorted(stats_dir.glob("fisher*.safetensors")):
        got.update(load_file(str(f)))
    worst = 0.0
    for n, r in ref.items():
        worst = max(worst, ((got[n] - r).abs().max() / r.abs().max().clamp_min(1e-30)).item())
    return worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=str(REPO / "bench" / "out" / "fisher"))
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--baseline-run", nargs=3, metavar=("MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    if args.baseline_run:
        baseline(*args.baseline_run, threads=args.threads)
        return 0

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model, data = build(workdir, args.examples, args.seq)
    num_params = SHAPE.num_parameters
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                           "torch": torch.__version__},
               "model_parameters": num_params, "examples": args.examples, "seq": args.seq, "runs": {}}

    out = workdir / "baseline"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--baseline-run", str(model), str(data), str(out),
                    "--threads", str(args.threads)], check=True, env=env)
    base = json.loads((out / "result.json").read_text())
    base["wall_s"] = time.perf_counter() - t  # process start included, as for the CLI runs
    results["runs"]["plain PyTorch loop"] = base
    print("baseline", base, flush=True)

    # a one-rank group runs plain autograd by default; a deepspeed config forces ZeRO-3
    zero3 = json.dumps({"zero_optimization": {"stage": 3}})
    # DeepSpeed's fixed live-parameter and sub-group sizes (1e9 elements) exceed this model:
    # every rank keeps the whole model gathered; scaled down they bound what a rank holds
    bounded = json.dumps({"zero_optimization": {"stage3_max_live_parameters": 10**7, "stage3_max_reuse_distance": 10**7,
                                                "sub_group_size": 10**7}})
    runs = (("1x1", 1, []), ("1x1 ZeRO-3", 1, ["--deepspeed", zero3]), ("1x2 ZeRO-3", 2, []),
            ("1x1 ZeRO-3 bounded", 1, ["--deepspeed", bounded]), ("1x2 ZeRO-3 bounded", 2, ["--deepspeed", bounded]))
    for name, ranks, extra in runs:
        out = workdir / f"sar-dist-{name.replace(' ', '-')}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sar_dist.cli", "fisher", "--model", str(model), "--data", str(data),
                        "--output", str(out), "--ranks-per-group", str(ranks), "--num-cpus", str(args.threads),
                        "--max-length", str(args.seq), *extra], check=True, env=env, cwd=REPO)
        wall = time.perf_counter() - t
        manifest = json.loads((out / "fisher.json").read_text())
        part = manifest["parts"][0]
        run = {"wall_s": wall, "compute_s": part["compute_s"], "tokens": manifest["num_tokens"],
               "engine": manifest["engine"], "peak_rss_bytes": part["peak_rss_bytes"],
               "max_rel_error_vs_baseline": compare(out, workdir / "baseline" / "stats.safetensors")}
        results["runs"][f"sar-dist fisher {name}"] = run
        print(name, run, flush=True)

    b = results["runs"]["plain PyTorch loop"]
    for run in results["runs"].values():
        run["tokens_per_s"] = run["tokens"] / run["compute_s"]
        run["compute_overhead_vs_baseline"] = run["compute_s"] / b["compute_s"]
        run["wall_overhead_vs_baseline"] = run["wall_s"] / b["wall_s"]
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'run':<36} {'wall s':>8} {'compute s':>10} {'tokens/s':>9} {'x base':>7}  peak RSS per model-holding process")
    for name, run in results["runs"].items():
        rss = ", ".join(f"{r / 2**20:.0f} MiB" for r in run["peak_rss_bytes"])
        print(f"{name:<36} {run['wall_s']:>8.1f} {run['compute_s']:>10.1f} {run['tokens_per_s']:>9.1f} "
              f"{run['compute_overhead_vs_baseline']:>7.2f}  {rss}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
