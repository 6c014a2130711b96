"""The README's first command: tiny RLVR-like models, their Fisher statistics and a merge, on a local Ray.

Run:
    make demo                        # sets up .venv, then runs this
    python -m pipelines.demo --workdir demo-out [--method ties] [--executor ray]

Builds a random Llama-shaped base and two sparse "RLVR" fine-tunes (a math one and a
code one, updating mostly different entries) and calibration data of each task, then runs
the pipeline file configs/pipeline/demo.yaml (`sar-dist run`): each fine-tune's diagonal
Fisher statistics (side by side on one local Ray), the SAR merge and the `sar-dist analyze`
report of the fine-tunes' update geometry, through the same code path a cluster uses. It
then verifies the output against its manifest, loads it with transformers and runs a forward
pass, and prints how much of each fine-tune's update survived the merge. With another
--method, the stages run one by one as separate commands (`--executor` applies there).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from sar_dist.checkpoint.index import open_checkpoint
from sar_dist.checkpoint.reader import read_tensor
from sar_dist.cli import main as cli_main
from sar_dist.storage import Storage
from sar_dist.synthetic import LlamaShape, make_base, make_finetune

SHAPE = LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256)


def build_models(root: Path) -> dict[str, str]:
    """Base + two RLVR-like fine-tunes with partly overlapping updates."""
    storage = Storage()
    paths = {name: str(root / name) for name in ("base", "rl-math", "rl-code")}
    if not (root / "rl-code" / "config.json").exists():
        make_base(storage, paths["base"], SHAPE, seed=0, max_shard_bytes=200_000)
        make_finetune(storage, paths["base"], paths["rl-math"], seed=1, density=0.05, region=(0.0, 0.6))
        make_finetune(storage, paths["base"], paths["rl-code"], seed=2, density=0.05, region=(0.4, 1.0))
    return paths


def write_calibration(root: Path, vocab: int, n: int = 16) -> dict[str, str]:
    """Calibration sets of each fine-tune's task: made-up words from two halves of the vocabulary."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    out = {}
    for task, (lo, hi) in {"math": (0, vocab // 2 - 3), "code": (vocab // 2, vocab - 3)}.items():
        def words(k: int, lo: int = lo, hi: int = hi) -> str:
            return " ".join(f"w{int(i)}" for i in torch.randint(lo, hi, (k,), generator=g))
        path = root / f"{task}.jsonl"
        path.write_text("".join(json.dumps({"prompt": words(8), "response": words(6)}) + "\n" for _ in range(n)))
        out[task] = str(path)
    return out


def update_retention(paths: dict[str, str], merged: str) -> dict[str, dict[str, float]]:
    """Per fine-tune: share of its updated entries the merge kept (exactly, or same sign)."""
    storage = Storage()
    idx = {k: open_checkpoint(storage, v) for k, v in paths.items()}
    out_idx = open_checkpoint(storage, merged)
    stats = {}
    for name in ("rl-math", "rl-code"):
        changed = kept_exact = kept_sign = 0
        for tname, ref in idx["base"].tensors.items():
            base = read_tensor(storage, ref).float()
            delta = read_tensor(storage, idx[name].tensors[tname]).float() - base
            merged_delta = read_tensor(storage, out_idx.tensors[tname]).float() - base
            mask = delta != 0
            changed += int(mask.sum())
            kept_exact += int((merged_delta[mask] == delta[mask]).sum())
            kept_sign += int((torch.sign(merged_delta[mask]) == torch.sign(delta[mask])).sum())
        stats[name] = {
            "updated_fraction": changed / sum(r.info.numel for r in idx["base"].tensors.values()),
            "kept_exactly": kept_exact / max(changed, 1),
            "kept_sign": kept_sign / max(changed, 1),
        }
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="demo-out")
    p.add_argument("--method", default="sar")
    p.add_argument("--executor", default="ray", choices=("ray", "local"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[demo] %(message)s")
    root = Path(args.workdir).resolve()
    paths = build_models(root / "models")
    data = write_calibration(root / "calibration", SHAPE.vocab)
    if args.method == "sar":
        # the whole SAR pipeline from one file: Fisher statistics of both fine-tunes (side by
        # side on the one Ray), the merge, the analyze report
        pipeline = _pipeline_file(root)
        print(f"pipeline: {pipeline}\n{Path(pipeline).read_text()}", flush=True)
        rc = cli_main(["run", pipeline])
        if rc != 0:
            return rc
        merged = root / "pipeline" / "merged-sar"
        report = root / "pipeline" / "analyze"
    else:
        rc, merged = _merge_by_hand(root, paths, data, args.method, args.executor)
        if rc != 0:
            return rc
        report = None
    rc = cli_main(["verify", str(merged)])
    if rc != 0:
        return rc

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(merged))
    tok = AutoTokenizer.from_pretrained(str(merged))
    ids = tok("w1 w2 w3 w4", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    print(f"\nloaded {merged} with transformers: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"forward pass logits {tuple(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}")
    stats = update_retention(paths, str(merged))
    print(f"\nwhat the {args.method} merge kept of each RLVR fine-tune's sparse update:")
    print(json.dumps(stats, indent=2))

    # the update geometry that makes standard merges fail on RLVR models, as a report
    if report is None:
        report = root / "analyze"
        print(f"\nsar-dist analyze (report and figures: {report}):", flush=True)
        return cli_main(["analyze", "--base", paths["base"], "--model", paths["rl-math"], "--model", paths["rl-code"],
                       "--fisher", str(root / "fisher" / "rl-math"), "--fisher", str(root / "fisher" / "rl-code"),
                       "--output", str(report), "--executor", args.executor])
    text = (report / "report.md").read_text()
    print(f"\nsar-dist analyze (report and figures: {report}):\n{text.split(chr(10) + '## Per module', 1)[0].rstrip()}",
          flush=True)
    return 0


PIPELINE = Path(__file__).resolve().parent.parent / "configs" / "pipeline" / "demo.yaml"


def _pipeline_file(root: Path) -> str:
    """configs/pipeline/demo.yaml, whose paths are under demo-out/: as it is for that workdir,
    else a copy with the paths moved under ``root``."""
    import yaml

    if root == (Path.cwd() / "demo-out").resolve():
        return str(PIPELINE.relative_to(Path.cwd())) if PIPELINE.is_relative_to(Path.cwd()) else str(PIPELINE)

    def move(x):
        if isinstance(x, str) and x.startswith("demo-out/"):
            return str(root / x.removeprefix("demo-out/"))
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        if isinstance(x, list):
            return [move(v) for v in x]
        return x

    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(move(yaml.safe_load(PIPELINE.read_text())), sort_keys=False))
    return str(path)


def _merge_by_hand(root: Path, paths: dict[str, str], data: dict[str, str], method: str,
                   executor: str) -> tuple[int, Path]:
    """Another method: the stages one by one, as the commands a user would type."""
    fisher_norms = {}
    for name, task in (("rl-math", "math"), ("rl-code", "code")):
        out = root / "fisher" / name
        rc = cli_main(["fisher", "--model", paths[name], "--data", data[task], "--output", str(out), "--groups", "2"])
        if rc != 0:
            return rc, out
        fisher_norms[name] = json.loads((out / "fisher.json").read_text())["l2_norm_mean"]
    print(f"\nFisher statistics (DeepSpeed ZeRO-3 on Ray, 2 groups each) in {root / 'fisher'}; "
          f"L2 norm of the mean diagonal Fisher: {json.dumps(fisher_norms)}\n", flush=True)
    params = {"ties": "{density: 0.5, weight: 1.0}"}.get(method, "{weight: 1.0}")
    config = root / f"{method}.yaml"
    merged = root / f"merged-{method}"
    fisher_lines = {name: f"    fisher: {root / 'fisher' / name}\n" if method == "fisher" else ""
                    for name in ("rl-math", "rl-code")}
    config.write_text(
        f"merge_method: {method}\n"
        f"base_model: {paths['base']}\n"
        "models:\n"
        f"  - model: {paths['rl-math']}\n{fisher_lines['rl-math']}"
        f"  - model: {paths['rl-code']}\n{fisher_lines['rl-code']}"
        f"parameters: {params}\n"
        "tokenizer_source: base\n"
        f"output: {merged}\n"
    )
    print(f"config: {config}\n{config.read_text()}", flush=True)
    return cli_main(["merge", str(config), "--executor", executor]), merged

if __name__ == "__main__":
    sys.exit(main())
