"""One rank of a Fisher group: a DeepSpeed ZeRO-3 world that accumulates squared gradients.

A group of ``R`` ranks shares one sharded copy of the model. At every step each rank runs
its own example (micro-batch 1), and the statistic wanted is the SUM over examples of the
squared per-example gradient. Two traps (DESIGN.md, "Fisher estimator"):

* ZeRO-3 reduce-scatters gradients as the cross-rank MEAN, so the partition a rank holds
  after ``backward`` is ``(1/R) sum_r g_r``; squaring it gives the square of a mean. A hook on
  each parameter replaces the gradient by ``R * g_r**2`` *before* DeepSpeed reduces it, so the
  reduced partition is ``(1/R) sum_r R g_r**2 = sum_r g_r**2``.
* The optimizer never steps: the statistics are taken at the given weights. DeepSpeed needs
  one to run ``backward``; it gets a zero-lr SGD that is never called.

Each rank adds its reduced partition into a float32 accumulator of partition size after every
step and clears DeepSpeed's gradient buffers (whose own accumulation would run in the
parameter dtype). Weights are loaded sharded: every rank range-reads only its own partition
of each tensor from the checkpoint. At the end each statistics tensor is gathered to the
rank that owns it (one tensor at a time) and streamed into that rank's shard of the part.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import MutableMapping
from typing import Any

import torch

from sar_dist.checkpoint.format import DTYPE_NAMES, DTYPES
from sar_dist.checkpoint.index import open_checkpoint
from sar_dist.checkpoint.reader import read_flat
from sar_dist.checkpoint.writer import ShardWriter
from sar_dist.fisher.types import IGNORE_INDEX, Example, PartSpec
from sar_dist.storage import Storage, join

logger = logging.getLogger(__name__)

PART_MARKER = "part.json"  # written last by rank 0: the part is complete


def import_deepspeed(device: str) -> Any:
    """Import DeepSpeed for ``device``, skipping the CPU backend's shared-memory op build.

    On CPU, DeepSpeed JIT-compiles a shared-memory collective inside ``init_distributed``
    (minutes on a small machine); gloo collectives are all this stage needs, so the builder
    is replaced by one that reports the op as unavailable, which DeepSpeed handles.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device == "cpu" else "cuda")
    if device == "cpu":
        comm_torch = importlib.import_module("deepspeed.comm.torch")
        comm_torch.build_shm_op = lambda: None
    import deepspeed

    return deepspeed


def build_model(deepspeed: Any, model_config: dict[str, Any], dtype: torch.dtype, ds_config: dict[str, Any]):
    """Build the model class of ``config.json`` with every parameter partitioned at creation."""
    import transformers

    config = dict(model_config)
    config_obj = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    # import the model's modules (and torch._dynamo, which they pull in) before zero.Init
    # patches tensor construction: importing them inside the context fails
    import torch._dynamo  # noqa: F401

    model_cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config_obj)]
    # no dtype= here: DeepSpeed 0.19 ignores it on accelerators without fp16 (the CPU) and
    # picks bfloat16; with dtype=None it follows the config (bf16.enabled, else float32)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = model_cls._from_config(config_obj, dtype=dtype)
    return model


def example_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of example ``index`` (the ``sampled`` estimator): keyed by (seed,
    example), so draws do not depend on groups, ranks or resume."""
    digest = hashlib.blake2b(f"sar-dist-fisher\0{seed}\0{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def target_log_likelihood(
    logits: torch.Tensor, labels: torch.Tensor, *, estimator: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Summed log-probability of the targets of one example.

    Args:
        logits: ``[T, V]`` for one sequence.
        labels: ``[T]`` aligned with the inputs (target t is predicted from positions < t).
        estimator: ``empirical`` uses the labels; ``sampled`` draws each target from the
            model's own distribution at that position (the true Fisher, one sample).
        generator: the example's stream (``sampled``).
    """
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = labels[1:]
    mask = targets != IGNORE_INDEX
    logp = logp[mask]
    if estimator == "sampled":
        with torch.no_grad():
            drawn = torch.multinomial(logp.detach().exp().cpu(), 1, generator=generator).squeeze(1)
        targets = drawn.to(logp.device)
    else:
        targets = targets[mask]
    return logp.gather(1, targets.unsqueeze(1)).sum()


def _flat_range(numel: int, rank: int, world: int) -> tuple[int, int, int]:
    """ZeRO-3's partition of a flattened parameter: ``(start, end, partition_numel)``."""
    per = math.ceil(numel / world)
    start = min(rank * per, numel)
    return start, min(start + per, numel), per


def run_rank(
    spec: PartSpec, *, rank: int, world: int, master: str, num_threads: int,
    progress: MutableMapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one rank of one group to the end; rank 0 returns the part's counts.

    Args:
        spec: the part.
        rank, world: this rank and the group's size.
        master: ``host:port`` of rank 0's rendezvous.
        num_threads: torch intra-op threads.
        progress: updated in place (``examples``, ``targets``, ``tokens``) for the driver.
    """
    progress = progress if progress is not None else {}
    torch.set_num_threads(num_threads)
    deepspeed = import_deepspeed(spec.device)
    # DeepSpeed warns about the zero-lr optimizer it is given on purpose, torch about the
    # collectives DeepSpeed calls: neither is actionable by a user of this stage
    deepspeed.utils.logger.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    import torch.distributed as dist

    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(
        dist_backend="gloo" if spec.device == "cpu" else "nccl",
        auto_mpi_discovery=False,
        init_method=f"tcp://{master}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=spec.timeout_s),
    )
    try:
        return _run(spec, deepspeed, dist, rank=rank, world=world, progress=progress)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(spec: PartSpec, deepspeed: Any, dist: Any, *, rank: int, world: int, progress: MutableMapping[str, Any]):
    storage = Storage(spec.storage_options)
    dtype = DTYPES[DTYPE_NAMES[spec.dtype]][0]
    device = torch.device("cpu") if spec.device == "cpu" else torch.device("cuda", torch.cuda.current_device())
    checkpoint = open_checkpoint(storage, spec.model_url)

    model = build_model(deepspeed, spec.model_config, dtype, spec.deepspeed)
    params = dict(model.named_parameters(remove_duplicate=False))
    unique = dict(model.named_parameters())  # tied names appear once
    loaded: set[int] = set()
    for slot in spec.slots:
        if slot.param is None or id(params[slot.param]) in loaded:
            continue
        p = params[slot.param]
        loaded.add(id(p))
        start, end, _ = _flat_range(p.ds_numel, rank, world)
        part = read_flat(storage, checkpoint.tensors[slot.name], start, end)
        p.ds_tensor.data[: end - start].copy_(part.to(p.ds_tensor.dtype))
    frozen = [n for n in unique if n not in {s.param for s in spec.slots}]
    assert not frozen, f"parameters with no checkpoint tensor: {frozen[:3]}"

    for p in unique.values():
        p.register_hook(lambda g, scale=float(world): g * g * scale)
    optimizer = torch.optim.SGD(unique.values(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=spec.deepspeed)
    engine.module.eval()  # no dropout: statistics at the given model, deterministic
    acc = {name: torch.zeros(p.ds_tensor.numel(), dtype=torch.float32, device=device) for name, p in unique.items()}
    t_compute = time.perf_counter()
    examples = spec.examples
    steps = math.ceil(len(examples) / world) if examples else 0
    done = targets_done = tokens_done = 0
    progress.update(examples=0, targets=0, tokens=0, steps_total=steps, started=time.time())
    for step in range(steps):
        i = step * world + rank
        real = i < len(examples)
        ex: Example = examples[i] if real else examples[0]  # a padding step: zero weight
        ids = torch.tensor(ex.input_ids, dtype=torch.long, device=device).unsqueeze(0)
        labels = torch.tensor(ex.labels, dtype=torch.long, device=device)
        logits = engine(input_ids=ids, use_cache=False).logits[0]
        gen = example_generator(spec.seed, ex.index) if spec.estimator == "sampled" else None
        ll = target_log_likelihood(logits, labels, estimator=spec.estimator, generator=gen)
        if not real:
            ll = ll * 0.0
        engine.backward(ll)
        for name, p in unique.items():
            acc[name].add_(deepspeed.utils.safe_get_local_grad(p))
        engine.optimizer.zero_grad()
        if real:
            done += 1
            targets_done += ex.num_targets
            tokens_done += len(ex.input_ids)
            progress.update(examples=done, targets=targets_done, tokens=tokens_done)
    del engine, optimizer
    compute_s = time.perf_counter() - t_compute

    counts = torch.tensor([done, targets_done, tokens_done], dtype=torch.int64)
    rss = torch.zeros(world, dtype=torch.int64)
    rss[rank] = _peak_rss_bytes()
    if world > 1:
        dist.all_reduce(counts)
        dist.all_reduce(rss)
    _write_part(spec, storage, dist, acc, params, unique, rank=rank, world=world)
    if world > 1:
        dist.barrier()
    result = {"part": spec.part, "num_examples": int(counts[0]), "num_targets": int(counts[1]),
              "num_tokens": int(counts[2]), "compute_s": round(compute_s, 3),
              "peak_rss_bytes": [int(x) for x in rss]}
    if rank == 0:
        index = {"metadata": {"total_size": sum(4 * math.prod(s.shape) for s in spec.slots)},
                 "weight_map": {s.name: spec.files[s.owner] for s in spec.slots}}
        storage.write_bytes(join(spec.url, "fisher.safetensors.index.json"), json.dumps(index, indent=2).encode())
        marker = {**result, "job_id": spec.job_id, "examples": [spec.examples[0].index, spec.examples[-1].index]
                  if spec.examples else None}
        storage.write_bytes(join(spec.url, PART_MARKER), json.dumps(marker, indent=2).encode())
    return result


def _peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _write_part(spec: PartSpec, storage: Storage, dist: Any, acc: dict[str, torch.Tensor], params, unique,
                *, rank: int, world: int) -> None:
    """Gather each statistics tensor to its owner, which streams it into its shard."""
    param_name = {id(p): n for n, p in unique.items()}
    by_owner: dict[int, list] = {}
    for slot in spec.slots:
        by_owner.setdefault(slot.owner, []).append(slot)
    from sar_dist.checkpoint.format import order_for_writing

    for owner in sorted(by_owner):
        slots = {s.name: s for s in by_owner[owner]}
        entries = order_for_writing([(s.name, "F32", s.shape) for s in slots.values()])
        writer = ShardWriter(storage, join(spec.url, spec.files[owner]), entries) if rank == owner else None
        if writer is not None:
            writer.__enter__()
        try:
            for name, _, shape in entries:
                slot = slots[name]
                numel = math.prod(shape)
                if slot.param is None:
                    full = torch.zeros(shape, dtype=torch.float32) if writer is not None else None
                else:
                    local = acc[param_name[id(params[slot.param])]].cpu()
                    if world == 1:
                        full = local[:numel].view(shape)
                    else:
                        bucket = [torch.empty_like(local) for _ in range(world)] if rank == owner else None
                        dist.gather(local, gather_list=bucket, dst=owner)
                        full = torch.cat(bucket)[:numel].view(shape) if bucket is not None else None
                if writer is not None:
                    writer.write(name, full)
        except BaseException as e:
            if writer is not None:
                writer.__exit__(type(e), e, e.__traceback__)
            raise
        if writer is not None:
            writer.__exit__(None, None, None)
