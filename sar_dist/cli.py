"""``sar-dist``: merge, inspect and verify checkpoints.

Exit codes: 0 done; 2 bad input or config (one line saying what and where, before
anything is written); 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("sar_dist")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """Raised inside the CLI for input problems; mapped to exit code 2."""


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sar-dist", description="Merge very large RLVR-trained checkpoints on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge checkpoints described by a YAML config")
    m.add_argument("config", help="merge config (YAML, mergekit keys)")
    m.add_argument("--output", help="output directory URL (overrides the config's 'output')")
    m.add_argument("--executor", choices=("ray", "local"), default="ray", help="where shard tasks run (default: ray)")
    m.add_argument("--ray-address", help="Ray cluster address; default: RAY_ADDRESS, else a local Ray")
    m.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    m.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="compute device of merge tasks")
    m.add_argument("--memory-budget", default="1GiB", help="bytes one task may hold for tensors (default 1GiB)")
    m.add_argument("--out-shard-size", help="target output shard size (default 5GB, or the config's)")
    m.add_argument("--dry-run", action="store_true", help="print the plan as JSON and exit")
    m.add_argument("--force", action="store_true", help="replace a different complete merge at the output")
    m.add_argument("--json", action="store_true", help="print one JSON event per line (for orchestrators)")

    i = sub.add_parser("inspect", help="list tensors of a checkpoint from its headers")
    i.add_argument("url", help="checkpoint directory or .safetensors file")
    i.add_argument("--json", action="store_true", help="print JSON")

    v = sub.add_parser("verify", help="check a merged output's shards against its manifest")
    v.add_argument("url", help="merged output directory")
    v.add_argument("--json", action="store_true", help="print JSON")
    for sp in (i, v):
        sp.add_argument("--storage-options", default="{}", help="fsspec options as JSON (no secrets)")
    return p


def _emitter(as_json: bool):
    def emit(event: dict[str, Any]) -> None:
        if as_json:
            print(json.dumps(event), flush=True)
            return
        kind = event["event"]
        if kind in ("tensor_done",):
            return
        if kind == "shard_done":
            eta = event.get("eta_s")
            logger.info(
                "shard %d/%d done (%s), tensors %d/%d, %s/%s, %.1f MB/s, ETA %s",
                event["shards_done"], event["shards_total"], event["file"], event["tensors_done"],
                event["tensors_total"], _human(event["bytes_done"]), _human(event["bytes_total"]),
                event["rate_mb_s"], f"{eta:.0f}s" if eta is not None else "-",
            )
        elif kind == "start":
            logger.info(
                "merging %d shard(s) with the %s executor into %s%s", event["todo_shards"], event["executor"],
                event["output"], f" (resuming: {event['resumed_shards']} already done)" if event["resumed_shards"] else "",
            )
        elif kind == "committed":
            logger.info("done: %s (%d tensors, %.1fs)", event["output"], event["tensors_total"], event["elapsed_s"])
        elif kind == "already_complete":
            logger.info("%s already holds this merge; nothing to do", event["output"])
    return emit


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def _load_yaml(path: str) -> Any:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise BadInput(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise BadInput(f"{path}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None


def _cmd_merge(args: argparse.Namespace) -> int:
    from sar_dist.config import MergeJob, parse_size
    from sar_dist.execute.run import execute, prepare
    from sar_dist.plan.planner import build_plan

    emit = _emitter(args.json)
    try:
        raw = _load_yaml(args.config)
        overrides: dict[str, Any] = {"output": args.output}
        if args.out_shard_size:
            overrides["out_shard_size"] = args.out_shard_size
        job = MergeJob.from_dict(raw, where=args.config, **overrides)
        budget = parse_size(args.memory_budget, "--memory-budget")
        if args.device == "cuda" and args.executor == "local":
            import torch

            if not torch.cuda.is_available():
                raise BadInput("--device cuda: no CUDA device is visible to this process")
        plan = build_plan(job, device=args.device, memory_budget=budget)
        for w in plan.warnings:
            logger.warning("%s", w)
        if args.dry_run:
            print(json.dumps(plan.summary(), indent=None if args.json else 2))
            return EXIT_OK
        prepared = prepare(plan, force=args.force)
    except (BadInput, ValueError) as e:
        return _bad_input(e)
    except OSError as e:  # unreachable storage, permissions
        return _bad_input(f"{e.__class__.__name__}: {e}")
    execute(prepared, executor=args.executor, emit=emit, ray_address=args.ray_address, num_cpus=args.num_cpus)
    return EXIT_OK


def _storage(args: argparse.Namespace):
    from sar_dist.config import _check_no_secrets
    from sar_dist.storage import Storage

    try:
        options = json.loads(args.storage_options)
    except json.JSONDecodeError as e:
        raise BadInput(f"--storage-options: invalid JSON ({e})") from None
    if not isinstance(options, dict):
        raise BadInput("--storage-options: expected a JSON object")
    _check_no_secrets(options, "--storage-options")
    return Storage(options)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from sar_dist.checkpoint.index import open_checkpoint, read_header
    from sar_dist.storage import display_url

    try:
        storage = _storage(args)
        url = args.url.rstrip("/")
        if url.endswith(".safetensors"):
            infos, _, size, _ = read_header(storage, url)
            rows = [(n, url, i) for n, i in infos.items()]
        else:
            names = storage.listdir(url)
            stem = "fisher" if any(n.startswith("fisher.safetensors") for n in names) else "model"
            index = open_checkpoint(storage, url, stem=stem)
            rows = [(n, r.file, r.info) for n, r in index.tensors.items()]
    except (BadInput, ValueError) as e:
        return _bad_input(e)
    except OSError as e:
        return _bad_input(f"{e.__class__.__name__}: {e}")
    total = sum(i.nbytes for _, _, i in rows)
    numel = sum(i.numel for _, _, i in rows)
    if args.json:
        print(json.dumps({
            "url": display_url(args.url),
            "num_tensors": len(rows),
            "num_parameters": numel,
            "bytes": total,
            "tensors": [{"name": n, "file": display_url(f).rsplit("/", 1)[-1], "dtype": i.dtype,
                         "shape": list(i.shape), "bytes": i.nbytes} for n, f, i in rows],
        }))
        return EXIT_OK
    width = max((len(n) for n, _, _ in rows), default=4)
    print(f"{'tensor':<{width}}  {'dtype':<7} {'shape':<20} {'bytes':>14}")
    for n, _, i in rows:
        print(f"{n:<{width}}  {i.dtype:<7} {str(list(i.shape)):<20} {i.nbytes:>14,}")
    print(f"{len(rows)} tensors, {numel:,} parameters, {total:,} bytes")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from sar_dist.execute.commit import verify_output

    try:
        problems = verify_output(_storage(args), args.url)
    except (BadInput, ValueError) as e:
        return _bad_input(e)
    except OSError as e:
        return _bad_input(f"{e.__class__.__name__}: {e}")
    if args.json:
        print(json.dumps({"url": args.url, "ok": not problems, "problems": problems}))
    else:
        for p in problems:
            print(f"MISMATCH {p}")
        print("ok: every shard matches the manifest" if not problems else f"{len(problems)} shard(s) do not match")
    return EXIT_OK if not problems else EXIT_FAILED


def _bad_input(e: object) -> int:
    message = str(e).splitlines()[0] if str(e) else e.__class__.__name__
    print(f"sar-dist: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sar-dist`` console script."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[sar-dist] %(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)  # our progress lines; other libraries stay at WARNING
    handlers = {"merge": _cmd_merge, "inspect": _cmd_inspect, "verify": _cmd_verify}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("sar-dist: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI boundary: one line, exit 1
        logger.debug("failure", exc_info=True)
        print(f"sar-dist: failed: {e.__class__.__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
