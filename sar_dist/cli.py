"""``sar-dist``: merge, Fisher statistics, analyze, inspect and verify checkpoints.

Exit codes: 0 done; 2 bad input or config (one line saying what and where, before
anything is written); 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("sar_dist")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """Raised inside the CLI for input problems; mapped to exit code 2."""


def _build_parser() -> argparse.ArgumentParser:
    from sar_dist.storage import READ_CONCURRENCY

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
    m.add_argument("--read-concurrency", type=int, default=READ_CONCURRENCY,
                   help=f"range requests in flight per task for remote inputs (default {READ_CONCURRENCY})")
    m.add_argument("--out-shard-size", help="target output shard size (default 5GB, or the config's)")
    m.add_argument("--dry-run", action="store_true", help="print the plan as JSON and exit")
    m.add_argument("--force", action="store_true", help="replace a different complete merge at the output")
    m.add_argument("--json", action="store_true", help="print one JSON event per line (for orchestrators)")

    f = sub.add_parser("fisher", help="diagonal Fisher statistics of a model on calibration data (DeepSpeed ZeRO-3 on Ray)")
    f.add_argument("config", nargs="?", help="Fisher config (YAML); flags override its keys")
    f.add_argument("--model", help="checkpoint directory URL")
    f.add_argument("--data", help="calibration JSONL URL")
    f.add_argument("--output", help="statistics directory URL")
    f.add_argument("--tokenizer", help="directory with tokenizer.json (default: the model's)")
    f.add_argument("--chat-template", help="chat template for chat records: a Jinja string or a .jinja URL "
                                           "(default: the tokenizer's)")
    f.add_argument("--chat-targets", choices=("last", "all"), help="assistant turns of {messages} records taken "
                                                                   "as targets (default: last)")
    f.add_argument("--prompt-key", help="field (parquet column) holding the prompt (default: prompt)")
    f.add_argument("--response-key", help="field holding the response (default: response)")
    f.add_argument("--messages-key", help="field holding the chat messages (default: messages)")
    f.add_argument("--num-examples", type=int, help="use at most this many examples")
    f.add_argument("--max-length", type=int, help="tokens per example (default 2048)")
    f.add_argument("--overlength", choices=("truncate", "refuse"), help="longer records: truncate (default) or refuse")
    f.add_argument("--estimator", choices=("empirical", "sampled"), help="targets from the data (default) or the model")
    f.add_argument("--groups", type=int, help="data-parallel groups (default 1)")
    f.add_argument("--ranks-per-group", type=int, help="ZeRO-3 ranks per group (default 1)")
    f.add_argument("--cpus-per-rank", type=int, help="CPUs per rank (default: the cluster's, spread over all ranks)")
    f.add_argument("--device", choices=("cpu", "cuda"), help="cpu (gloo) or cuda (nccl, a GPU per rank)")
    f.add_argument("--dtype", choices=("float32", "bfloat16"), help="parameter dtype of the sharded model")
    # no argparse choices: the config's check gives a bad value its one-line error (exit 2)
    f.add_argument("--stats-dtype", metavar="float32|bfloat16",
                   help="dtype of the committed statistics (default float32; sums are float32 either way)")
    f.add_argument("--seed", type=int, help="keys the sampled estimator's draws")
    f.add_argument("--keep-parts", action="store_const", const=True, help="keep parts/ after the reduce")
    f.add_argument("--deepspeed", help="a DeepSpeed config as JSON, merged into ours (forces ZeRO-3 at one rank)")
    f.add_argument("--storage-options", help="fsspec options as JSON (no secrets)")
    f.add_argument("--ray-address", help="Ray cluster address; default: RAY_ADDRESS, else a local Ray")
    f.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    f.add_argument("--force", action="store_true", help="replace statistics of a different job at the output")
    f.add_argument("--json", action="store_true", help="print one JSON event per line (for orchestrators)")

    a = sub.add_parser("analyze", help="update geometry of fine-tunes: sparsity, overlap, cosine, off-principal share")
    a.add_argument("--base", required=True, help="base checkpoint directory URL")
    a.add_argument("--model", action="append", required=True, help="fine-tuned checkpoint directory URL (repeatable)")
    a.add_argument("--fisher", action="append", help="Fisher statistics directory, one per --model in the same order")
    a.add_argument("--output", required=True, help="report directory URL")
    a.add_argument("--tolerance", type=float, default=0.0, help="an entry is updated when |t| > this (default 0)")
    a.add_argument("--rank-fraction", type=float, default=0.01, help="principal subspace size / min(m, n) (0.01)")
    a.add_argument("--svd", choices=("auto", "exact", "randomized"), default="auto",
                   help="SVD of the base's 2-D tensors (auto: exact up to min(m, n) = 1024)")
    a.add_argument("--executor", choices=("ray", "local"), default="ray", help="where tensor tasks run (default: ray)")
    a.add_argument("--ray-address", help="Ray cluster address; default: RAY_ADDRESS, else a local Ray")
    a.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    a.add_argument("--storage-options", default="{}", help="fsspec options as JSON (no secrets)")
    a.add_argument("--force", action="store_true",
                   help="write into a non-empty directory beside files sar-dist did not write (never over them)")
    a.add_argument("--json", action="store_true", help="print the report summary as JSON")

    r = sub.add_parser("run", help="a whole pipeline from one YAML file: Fisher statistics per model, merge, analyze")
    r.add_argument("pipeline", help="pipeline file (YAML): models, fisher settings, merge settings, where outputs go")
    r.add_argument("--stage", choices=("fisher", "merge", "analyze"),
                   help="run only this stage (default: every stage in order); each is idempotent")
    r.add_argument("--model", help="with --stage fisher: only this model's statistics (its name in the file)")
    r.add_argument("--dry-run", action="store_true", help="print the whole plan as JSON and exit")
    r.add_argument("--json", action="store_true", help="print one JSON event per line (for orchestrators)")
    r.add_argument("--force", action="store_true", help="replace outputs of a different job at the same URLs")
    r.add_argument("--storage-options", help="fsspec options as JSON (no secrets); overrides the file's")
    r.add_argument("--ray-address", help="Ray cluster address; default: RAY_ADDRESS, else a local Ray")
    r.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")

    i = sub.add_parser("inspect", help="list tensors of a checkpoint from its headers")
    i.add_argument("url", help="checkpoint directory or .safetensors file")
    i.add_argument("--json", action="store_true", help="print JSON")

    v = sub.add_parser("verify", help="check a merged output's shards against its manifest")
    v.add_argument("url", help="merged output directory")
    v.add_argument("--json", action="store_true", help="print JSON")
    for sp in (i, v):
        sp.add_argument("--storage-options", default="{}", help="fsspec options as JSON (no secrets)")
    return p


def _print_event(event: dict[str, Any]) -> None:
    """One ``--json`` event line, with credentials in any URL removed."""
    from sar_dist.storage import redact_obj

    print(json.dumps(redact_obj(event)), flush=True)


def _emitter(as_json: bool, bars: Any = None, prefix: str = ""):
    """Merge events: JSON lines, or log lines (and a live bar when stderr is a terminal)."""
    log = _Log(bars, prefix)

    def emit(event: dict[str, Any]) -> None:
        if as_json:
            _print_event(event)
            return
        if bars is not None and bars(event):
            return
        kind = event["event"]
        if kind in ("tensor_done",):
            return
        if kind == "shard_done":
            eta = event.get("eta_s")
            log.info(
                "shard %d/%d done (%s), tensors %d/%d, %s/%s, %.1f MB/s, ETA %s",
                event["shards_done"], event["shards_total"], event["file"], event["tensors_done"],
                event["tensors_total"], _human(event["bytes_done"]), _human(event["bytes_total"]),
                event["rate_mb_s"], f"{eta:.0f}s" if eta is not None else "-",
            )
        elif kind == "start":
            log.info(
                "merging %d shard(s) with the %s executor into %s%s", event["todo_shards"], event["executor"],
                event["output"], f" (resuming: {event['resumed_shards']} already done)" if event["resumed_shards"] else "",
            )
        elif kind == "committed":
            log.info("done: %s (%d tensors, %.1fs)", event["output"], event["tensors_total"], event["elapsed_s"])
        elif kind == "already_complete":
            log.info("%s already holds this merge; nothing to do", event["output"])
    return emit


class _Log:
    """``logger.info``/``warning`` with a prefix (the stage and model of ``sar-dist run``),
    written above the live bars when there are some."""

    def __init__(self, bars: Any, prefix: str) -> None:
        self._bars, self._prefix = bars, prefix

    def _out(self, level: int, msg: str, *args: Any) -> None:
        if self._bars is not None and logger.isEnabledFor(level):
            self._bars.write(f"[sar-dist] {self._prefix}{msg % args if args else msg}")
        else:
            logger.log(level, self._prefix + msg, *args)

    def info(self, msg: str, *args: Any) -> None:
        self._out(logging.INFO, msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self._out(logging.WARNING, msg, *args)


def _progress_bars(as_json: bool):
    """Live bars when a person watches (stderr is a terminal, no --json); else None."""
    if as_json or not sys.stderr.isatty() or os.environ.get("SAR_DIST_NO_BARS"):
        return None
    from sar_dist.terminal import ProgressBars

    return ProgressBars(sys.stderr)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def _load_yaml(path: str) -> Any:
    from sar_dist.config import load_yaml

    try:
        return load_yaml(path)
    except ValueError as e:
        raise BadInput(str(e)) from None


def _cmd_merge(args: argparse.Namespace) -> int:
    from sar_dist.config import MergeJob, parse_size
    from sar_dist.execute.run import execute, prepare
    from sar_dist.plan.planner import build_plan

    bars = _progress_bars(args.json)
    emit = _emitter(args.json, bars)
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
        plan = build_plan(job, device=args.device, memory_budget=budget, read_concurrency=args.read_concurrency)
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
    try:
        execute(prepared, executor=args.executor, emit=emit, ray_address=args.ray_address, num_cpus=args.num_cpus)
    finally:
        if bars is not None:
            bars.close()
    return EXIT_OK


def _fisher_emitter(as_json: bool, bars: Any = None, prefix: str = ""):
    """Fisher events: JSON lines, or log lines (and a live bar when stderr is a terminal)."""
    log = _Log(bars, prefix)

    def emit(event: dict[str, Any]) -> None:
        if as_json:
            _print_event(event)
            return
        if bars is not None and bars(event):
            return
        kind = event["event"]
        if kind == "start":
            log.info(
                "Fisher statistics of %d examples (%d target tokens): %d group(s) x %d rank(s), %s estimator -> %s%s",
                event["examples_total"], event["target_tokens_total"], event["groups"], event["ranks_per_group"],
                event["estimator"], event["output"],
                f" (resuming: {event['parts_resumed']} part(s) done)" if event["parts_resumed"] else "",
            )
        elif kind == "progress":
            eta = event.get("eta_s")
            log.info("examples %d/%d, target tokens %d/%d, %.1f tokens/s, ETA %s", event["examples_done"],
                        event["examples_total"], event["target_tokens_done"], event["target_tokens_total"],
                        event["tokens_per_s"], f"{eta:.0f}s" if eta is not None else "-")
        elif kind == "part_done":
            log.info("part %d done (%d/%d)", event["part"], event["parts_done"], event["parts_total"])
        elif kind == "part_retry":
            log.warning("part %d failed (%s); restarting it (attempt %d)", event["part"], event["error"],
                           event["attempt"])
        elif kind == "committed":
            log.info("done: %s (%d examples, L2 norm of the mean %.4g, %.1fs)", event["output"],
                        event["num_examples"], event["l2_norm_mean"], event["elapsed_s"])
        elif kind == "already_complete":
            log.info("%s already holds these statistics; nothing to do", event["output"])
    return emit


def _json_arg(text: str | None, flag: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{flag}: invalid JSON ({e})") from None


def _cmd_fisher(args: argparse.Namespace) -> int:
    from sar_dist.fisher.config import FisherJob
    from sar_dist.fisher.plan import build_fisher_plan
    from sar_dist.fisher.run import ClusterTooSmall, prepare_output, run_fisher
    from sar_dist.output import LeaseHeld

    try:
        raw = _load_yaml(args.config) if args.config else {}
        options = _json_arg(args.storage_options, "--storage-options")
        ds = _json_arg(args.deepspeed, "--deepspeed")
        overrides = {
            "model": args.model, "data": args.data, "output": args.output, "tokenizer": args.tokenizer,
            "num_examples": args.num_examples, "max_length": args.max_length, "overlength": args.overlength,
            "estimator": args.estimator, "groups": args.groups, "ranks_per_group": args.ranks_per_group,
            "cpus_per_rank": args.cpus_per_rank, "device": args.device, "dtype": args.dtype,
            "stats_dtype": args.stats_dtype, "seed": args.seed,
            "keep_parts": args.keep_parts, "storage_options": options, "deepspeed": ds,
            "chat_template": args.chat_template, "chat_targets": args.chat_targets, "prompt_key": args.prompt_key,
            "response_key": args.response_key, "messages_key": args.messages_key,
        }
        job = FisherJob.from_dict(raw, where=args.config or "flags", **overrides)
        if job.device == "cuda":
            import torch

            if not torch.cuda.is_available() and not (args.ray_address or os.environ.get("RAY_ADDRESS")):
                raise BadInput("--device cuda: no CUDA device is visible and no Ray cluster address was given")
        plan = build_fisher_plan(job)
        if plan.data.truncated:
            logger.warning("%d of %d examples were longer than max_length=%d and were truncated",
                           plan.data.truncated, len(plan.data.examples), job.max_length)
        prepare_output(plan, force=args.force)
    except (BadInput, ValueError) as e:
        return _bad_input(e)
    except OSError as e:
        return _bad_input(f"{e.__class__.__name__}: {e}")
    bars = _progress_bars(args.json)
    try:
        run_fisher(plan, emit=_fisher_emitter(args.json, bars), ray_address=args.ray_address, num_cpus=args.num_cpus,
                   force=args.force)
    except (ClusterTooSmall, LeaseHeld) as e:  # checked once Ray is up, before anything is written
        return _bad_input(e)
    finally:
        if bars is not None:
            bars.close()
    return EXIT_OK


def _run_emitter(as_json: bool, bars: Any):
    """Pipeline events: JSON lines (each with its ``stage`` and ``model``), or each stage's own
    log lines prefixed with its stage and model."""
    emitters: dict[tuple[str, str], Any] = {}

    def emit(event: dict[str, Any]) -> None:
        if as_json:
            _print_event(event)
            return
        stage, model, kind = event.get("stage", ""), event.get("model", ""), event["event"]
        if kind == "stage_start":
            logger.info("stage %s", stage)
            return
        if kind == "stage_done":
            return
        if stage == "analyze":  # sar_dist.analyze logs its own lines
            return
        key = (stage, model)
        if key not in emitters:
            prefix = f"[{stage} {model}] " if model else f"[{stage}] "
            emitters[key] = (_fisher_emitter if stage == "fisher" else _emitter)(False, bars, prefix)
        emitters[key](event)
    return emit


def _cmd_run(args: argparse.Namespace) -> int:
    from sar_dist.fisher.run import ClusterTooSmall
    from sar_dist.output import LeaseHeld
    from sar_dist.pipeline.config import load_pipeline
    from sar_dist.pipeline.run import plan_pipeline, run_pipeline, summary

    try:
        options = _json_arg(args.storage_options, "--storage-options")
        if options is not None and not isinstance(options, dict):
            raise BadInput("--storage-options: expected a JSON object")
        job = load_pipeline(args.pipeline, storage_options=options)
        plan = plan_pipeline(job, stage=args.stage, model=args.model, force=args.force)
        for name, p in plan.fisher.items():
            if p.data.truncated:
                logger.warning("[fisher %s] %d of %d examples were longer than max_length=%d and were truncated",
                               name, p.data.truncated, len(p.data.examples), p.job.max_length)
        if args.dry_run:
            print(json.dumps(summary(plan), indent=None if args.json else 2))
            return EXIT_OK
    except (BadInput, ValueError) as e:
        return _bad_input(e)
    except OSError as e:
        return _bad_input(f"{e.__class__.__name__}: {e}")
    bars = _progress_bars(args.json)
    try:
        run_pipeline(plan, _run_emitter(args.json, bars), ray_address=args.ray_address, num_cpus=args.num_cpus,
                     force=args.force)
    except (ClusterTooSmall, LeaseHeld) as e:  # checked once Ray is up, before anything is written
        return _bad_input(e)
    finally:
        if bars is not None:
            bars.close()
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
    from sar_dist.storage import check_no_userinfo, display_url

    try:
        storage = _storage(args)
        check_no_userinfo(args.url, "url")
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
    from sar_dist.storage import check_no_userinfo

    try:
        check_no_userinfo(args.url, "url")
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


def _cmd_analyze(args: argparse.Namespace) -> int:
    from sar_dist.analyze.run import execute_analyze, prepare_analyze, render_markdown, summary

    try:
        options = _json_arg(args.storage_options, "--storage-options")
        if not isinstance(options, dict):
            raise BadInput("--storage-options: expected a JSON object")
        plan = prepare_analyze(args.base, args.model, args.output, fisher=args.fisher, storage_options=options,
                               tolerance=args.tolerance, rank_fraction=args.rank_fraction, svd=args.svd,
                               force=args.force)
    except (BadInput, ValueError) as e:
        return _bad_input(e)
    except OSError as e:
        return _bad_input(f"{e.__class__.__name__}: {e}")
    report = execute_analyze(plan, executor=args.executor, ray_address=args.ray_address, num_cpus=args.num_cpus)
    if args.json:
        print(json.dumps(summary(report)))
    else:
        text = render_markdown(report)
        print(text.split("\n## Per module", 1)[0].rstrip())
    return EXIT_OK


def printable(text: str) -> str:
    """``text`` as one line: control characters (a newline in a tensor name, say) escaped, URLs redacted."""
    from sar_dist.storage import redact

    out = []
    for ch in redact(text):
        if ch == "\t" or (ch.isprintable() or ch == " "):
            out.append(" " if ch == "\t" else ch)
        else:
            out.append(repr(ch)[1:-1] if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return "".join(out)


def _bad_input(e: object) -> int:
    message = printable(str(e)) if str(e) else e.__class__.__name__
    print(f"sar-dist: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sar-dist`` console script."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[sar-dist] %(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)  # our progress lines; other libraries stay at WARNING
    handlers = {"merge": _cmd_merge, "fisher": _cmd_fisher, "inspect": _cmd_inspect, "verify": _cmd_verify,
                "analyze": _cmd_analyze, "run": _cmd_run}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("sar-dist: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI boundary: one line, exit 1
        from sar_dist.finite import NonFiniteError

        if isinstance(e, NonFiniteError):  # NaN/inf met while running: bad input all the same
            return _bad_input(e)
        logger.debug("failure", exc_info=True)
        print(f"sar-dist: failed: {e.__class__.__name__}: {printable(str(e))}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
