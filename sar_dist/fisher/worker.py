"""One rank of a Fisher group: a DeepSpeed ZeRO-3 world that accumulates squared gradients.

A group of ``R`` ranks shares one sharded copy of the model. At every step each rank runs
its own example (micro-batch 1), and the statistic wanted is the SUM over examples of the
squared per-example gradient.

DeepSpeed's ZeRO-3 optimizer would reduce-scatter gradients as the cross-rank MEAN (the
square of a mean is not wanted) and brings state this stage never uses: a float32 master
copy of the partitions, a transient gradient buffer, reduce buckets, gradient partitions.
So the engine is built WITHOUT an optimizer: DeepSpeed then sets up only its parameter
partitioning (gather a module's parameters before it runs, forward or backward; release
them after). A hook on each parameter takes its gradient as soon as autograd has it (the
parameter is gathered then), squares it in float32 one partition at a time and sums each
partition onto its rank (``reduce_squares``), where it is added into a float32 accumulator
of partition size; the gradient is dropped at once. The optimizer never exists: the
statistics are taken at the given weights.

Per rank this leaves: fixed memory (imports, buffers, the persistent small parameters, at
most ``stage3_max_live_parameters`` gathered elements and one parameter's gradient) plus
(weights + float32 accumulators) / R. Weights are loaded sharded: every rank range-reads
only its own partition of each tensor from the checkpoint. At the end each statistics
tensor is gathered to the rank that owns it (one tensor at a time) and streamed into that
rank's shard of the part.

Non-finite values stop the rank with a ``NonFiniteError`` (``sar_dist.finite``; the driver
never retries it), unless the job allows them: a weight as it is loaded (naming the tensor),
each example's log-likelihood before its backward (naming the example: its 0-based index in
data order), and each statistics tensor before it is written (naming the tensor and the part's
examples: a finite loss can still give an infinite squared gradient).
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass, field
from typing import Any

import torch

from sar_dist.checkpoint.format import DTYPE_NAMES, DTYPES, order_for_writing
from sar_dist.checkpoint.index import open_checkpoint
from sar_dist.checkpoint.reader import read_flat
from sar_dist.checkpoint.writer import ShardWriter
from sar_dist.finite import OPT_OUT, NonFiniteError, check_finite
from sar_dist.fisher.types import IGNORE_INDEX, Example, PartSpec, TensorSlot
from sar_dist.memory import bound_heap, peak_rss_bytes, rss_bytes
from sar_dist.storage import Storage, display_url, join

logger = logging.getLogger(__name__)

PART_MARKER = "part.json"  # written last by rank 0: the part is complete
# float32 elements of squared gradient reduced at a time (32 MiB): the transient of a reduce
REDUCE_PIECE_ELEMENTS = 8 * 2**20


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


def _skip_init():
    """transformers' context that skips random weight init (every weight is loaded after)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _model_class(model_config: dict[str, Any]) -> tuple[Any, Any]:
    import transformers

    config = dict(model_config)
    config_obj = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    return transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config_obj)], config_obj


def build_model(deepspeed: Any | None, model_config: dict[str, Any], dtype: torch.dtype,
                ds_config: dict[str, Any] | None = None, device: torch.device | None = None):
    """Build the model class of ``config.json`` without initialising its weights: with every
    parameter partitioned at creation (``deepspeed`` given: ZeRO-3), or whole on ``device``."""
    # import the model's modules (and torch._dynamo, which they pull in) before zero.Init
    # patches tensor construction: importing them inside the context fails
    import torch._dynamo  # noqa: F401

    model_cls, config_obj = _model_class(model_config)
    # skipping init skips the tying that init does: tie explicitly (a no-op when untied)
    if deepspeed is None:
        with _skip_init(), torch.device(device or "cpu"):
            model = model_cls._from_config(config_obj, dtype=dtype)
            model.tie_weights()
        return model
    # no dtype= here: DeepSpeed 0.19 ignores it on accelerators without fp16 (the CPU) and
    # picks bfloat16; with dtype=None it follows the config (bf16.enabled, else float32)
    with _skip_init(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = model_cls._from_config(config_obj, dtype=dtype)
        model.tie_weights()
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


def _flat_range(numel: int, rank: int, world: int) -> tuple[int, int]:
    """ZeRO-3's partition of a flattened parameter: elements ``[start, end)`` (the last
    partition is padded by DeepSpeed beyond ``numel``)."""
    per = math.ceil(numel / world)
    start = min(rank * per, numel)
    return start, min(start + per, numel)


def run_rank(
    spec: PartSpec, *, rank: int, world: int, master: str, num_threads: int,
    progress: MutableMapping[str, Any] | None = None, node: str | None = None,
) -> dict[str, Any]:
    """Run one rank of one group to the end and write its share of the part.

    Args:
        spec: the part.
        rank, world: this rank and the group's size.
        master: ``host:port`` of rank 0's rendezvous (unused by a one-rank ``torch`` group).
        num_threads: torch intra-op threads.
        progress: updated in place (``examples``, ``targets``, ``tokens``) for the driver.
        node: this rank's Ray node id, recorded in the part (rank 0 collects them).

    Returns:
        The part's counts (the same on every rank).
    """
    progress = progress if progress is not None else {}
    bound_heap()  # freed gathers and gradients leave the rank's memory (sar_dist.memory)
    torch.set_num_threads(num_threads)
    if spec.engine == "torch":
        assert world == 1, "the torch engine runs one-rank groups"
        return _finish(spec, *_accumulate_torch(spec, progress), dist=None, rank=0, world=1, node=node)
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
        acc, counts = _accumulate_zero3(spec, deepspeed, rank=rank, world=world, progress=progress)
        return _finish(spec, acc, counts, dist=dist, rank=rank, world=world, node=node)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Counts:
    """What one rank did: examples, target tokens, input tokens, seconds in the loop."""

    examples: int = 0
    targets: int = 0
    tokens: int = 0
    compute_s: float = 0.0
    memory: dict[str, int] = field(default_factory=dict)


def _device(spec: PartSpec) -> torch.device:
    return torch.device("cpu") if spec.device == "cpu" else torch.device("cuda", torch.cuda.current_device())


def _loop(spec: PartSpec, forward, backward, *, rank: int, world: int, progress: MutableMapping[str, Any]) -> Counts:
    """Step through the group's examples: at step s, rank r takes example ``s * world + r``.

    A rank with no example left at the last step runs example 0 with weight 0, so every
    rank joins every collective.
    """
    device = _device(spec)
    examples = spec.examples
    steps = math.ceil(len(examples) / world) if examples else 0
    counts = Counts()
    progress.update(examples=0, targets=0, tokens=0, steps_total=steps, started=time.time())
    t0 = time.perf_counter()
    for step in range(steps):
        i = step * world + rank
        real = i < len(examples)
        ex: Example = examples[i] if real else examples[0]
        ids = torch.tensor(ex.input_ids, dtype=torch.long, device=device).unsqueeze(0)
        labels = torch.tensor(ex.labels, dtype=torch.long, device=device)
        logits = forward(input_ids=ids, use_cache=False).logits[0]
        gen = example_generator(spec.seed, ex.index) if spec.estimator == "sampled" else None
        ll = target_log_likelihood(logits, labels, estimator=spec.estimator, generator=gen)
        if real and not spec.allow_nonfinite:
            _check_loss(ll, ex)
        backward(ll if real else ll * 0.0)
        if real:
            counts.examples += 1
            counts.targets += ex.num_targets
            counts.tokens += len(ex.input_ids)
            progress.update(examples=counts.examples, targets=counts.targets, tokens=counts.tokens)
    counts.compute_s = time.perf_counter() - t0
    return counts


def _check_loss(ll: torch.Tensor, ex: Example) -> None:
    """Stop on a non-finite log-likelihood, naming the example (one scalar read per step)."""
    value = ll.item()
    if not math.isfinite(value):
        raise NonFiniteError(f"example {ex.index} (0-based, in data order): the log-likelihood of its "
                             f"{ex.num_targets} target token(s) is {value}; {OPT_OUT}")


def _load_weight(spec: PartSpec, storage: Storage, ref: Any, name: str, start: int, end: int) -> torch.Tensor:
    """Elements ``[start, end)`` of a checkpoint tensor, checked for NaN/inf."""
    flat = read_flat(storage, ref, start, end)
    if not spec.allow_nonfinite:
        whole = start == 0 and end == ref.info.numel
        check_finite(flat, f"model {display_url(spec.model_url)}", name,
                     span="" if whole else f"elements {start}-{end - 1} of {ref.info.numel}")
    return flat


def _accumulate_torch(spec: PartSpec, progress: MutableMapping[str, Any]) -> tuple[dict[str, torch.Tensor], Counts]:
    """A one-rank group: the whole model in this process, plain autograd.

    ZeRO-3 over a single rank shards nothing and still reduce-scatters every gradient through
    gloo (measured: 0.7 s per example on a 121M-parameter model, more than the forward and
    backward themselves), so a one-rank group runs without DeepSpeed unless its config asks
    for it. As soon as autograd has a parameter's gradient, ``acc += grad**2`` in float32 (one
    fused pass) and the gradient is dropped: at most the gradients autograd is still
    producing are alive, never a whole-model set.
    """
    storage = Storage(spec.storage_options)
    checkpoint = open_checkpoint(storage, spec.model_url)
    device = _device(spec)
    model = build_model(None, spec.model_config, DTYPES[DTYPE_NAMES[spec.dtype]][0], device=device)
    memory = {"built": rss_bytes()}
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for p, slots in _params_to_load(spec, params):
            p.copy_(_load_param(spec, storage, checkpoint, slots, p.numel(), 0, p.numel()).view(p.shape))
    memory.update(loaded=rss_bytes(), engine=rss_bytes())
    model.eval()  # no dropout: statistics at the given model, deterministic
    unique = dict(model.named_parameters())
    acc = {id(p): torch.zeros(p.numel(), dtype=torch.float32, device=device) for p in unique.values()}

    def consume(p: torch.nn.Parameter) -> None:
        # runs once per parameter and backward, after autograd summed every use (tied weights)
        g = p.grad.reshape(-1).float()
        acc[id(p)].addcmul_(g, g)
        p.grad = None

    for p in unique.values():
        p.register_post_accumulate_grad_hook(consume)
    counts = _loop(spec, model, lambda ll: ll.backward(), rank=0, world=1, progress=progress)
    counts.memory = {**memory, "after_loop": rss_bytes(), "peak": peak_rss_bytes()}
    return {name: acc[id(p)] for name, p in params.items()}, counts


def _accumulate_zero3(spec: PartSpec, deepspeed: Any, *, rank: int, world: int,
                      progress: MutableMapping[str, Any]) -> tuple[dict[str, torch.Tensor], Counts]:
    """A ZeRO-3 rank: its partition of every parameter, the sum of squares over the group.

    The engine is built without an optimizer, so DeepSpeed sets up only its parameter
    partitioning (``DeepSpeedZeRoOffload``: gather before a module runs, forward or backward,
    release after) and none of the ZeRO-3 optimizer's state: no float32 master copy of the
    partitions, no transient gradient buffer of partition size in ``initialize_optimizer_states``,
    no reduce buckets, no gradient partitions in the parameter dtype. Each parameter's gradient
    is taken by a hook as soon as autograd has it (while the parameter is gathered) and reduced
    here: ``reduce_squares``.
    """
    storage = Storage(spec.storage_options)
    checkpoint = open_checkpoint(storage, spec.model_url)
    model = build_model(deepspeed, spec.model_config, DTYPES[DTYPE_NAMES[spec.dtype]][0], spec.deepspeed)
    memory = {"built": rss_bytes()}
    params = dict(model.named_parameters(remove_duplicate=False))
    # sharded load: each rank range-reads its own slice of each flattened tensor into its
    # partition (the engine keeps these partitions as they are: no optimizer flattens them)
    for p, slots in _params_to_load(spec, params):
        start, end = _flat_range(p.ds_numel, rank, world)
        p.ds_tensor.data[: end - start].copy_(_load_param(spec, storage, checkpoint, slots, p.ds_numel, start, end))
    memory["loaded"] = rss_bytes()
    unique = dict(model.named_parameters())
    device = _device(spec)
    # padded to the partition size, so the final gathers have equal pieces
    acc = {id(p): torch.zeros(math.ceil(p.ds_numel / world), dtype=torch.float32, device=device)
           for p in unique.values()}
    import torch.distributed as dist

    def consume(p: torch.nn.Parameter) -> None:
        reduce_squares(p.grad, acc[id(p)], dist, rank=rank, world=world)
        p.grad = None

    for p in unique.values():
        p.register_post_accumulate_grad_hook(consume)
    engine, *_ = deepspeed.initialize(model=model, config=spec.deepspeed)
    engine.module.eval()  # no dropout: statistics at the given model, deterministic
    memory["engine"] = rss_bytes()
    # the module itself, not the engine: the engine's forward hooks the output for its own
    # backward (which needs an optimizer); the gather/release hooks sit on the module
    counts = _loop(spec, engine.module, lambda ll: ll.backward(), rank=rank, world=world, progress=progress)
    counts.memory = {**memory, "after_loop": rss_bytes(), "peak": peak_rss_bytes()}
    engine.destroy()
    return {name: acc[id(p)] for name, p in params.items()}, counts


def reduce_squares(grad: torch.Tensor, acc: torch.Tensor, dist: Any, *, rank: int, world: int) -> None:
    """Add ``sum_r grad_r**2`` over the group's ranks, this rank's partition of it, into ``acc``.

    Each rank holds its own example's whole gradient of one (gathered) parameter. The squares
    are formed in float32 one partition at a time and summed onto the partition's rank with a
    ``reduce`` (gloo has no reduce-scatter), so the transient is one partition of one parameter
    in float32, whatever the model size.

    Args:
        grad: this rank's gradient of one parameter (any shape, the parameter's dtype).
        acc: this rank's float32 accumulator, ``ceil(numel / world)`` elements.
        dist: ``torch.distributed``, initialised.
        rank, world: this rank and the group's size.
    """
    flat = grad.reshape(-1)
    numel = flat.numel()
    for r in range(world):
        start, end = _flat_range(numel, r, world)
        # every rank walks the same pieces (empty partitions give none): the reduces pair up
        for lo in range(start, end, REDUCE_PIECE_ELEMENTS):
            hi = min(end, lo + REDUCE_PIECE_ELEMENTS)
            piece = flat[lo:hi].float()
            piece.square_()
            if world > 1:
                dist.reduce(piece, dst=r)
            if r == rank:
                acc[lo - start: hi - start].add_(piece)


def _params_to_load(spec: PartSpec, params: dict[str, torch.nn.Parameter]):
    """(parameter, checkpoint slots) pairs, each parameter once: one slot for a parameter
    stored as it is (tied names share the first), every slot of a fused parameter."""
    by_param: dict[int, list[TensorSlot]] = {}
    for slot in spec.slots:
        if slot.param is None:
            continue
        slots = by_param.setdefault(id(params[slot.param]), [])
        if slot.view is not None or not slots:
            slots.append(slot)
    missing = [n for n, p in params.items() if id(p) not in by_param]
    assert not missing, f"parameters with no checkpoint tensor: {missing[:3]}"
    unique = {id(p): p for p in params.values()}
    for key, slots in by_param.items():
        yield unique[key], slots


def _load_param(spec: PartSpec, storage: Storage, checkpoint: Any, slots: list[TensorSlot], numel: int,
                start: int, end: int) -> torch.Tensor:
    """Elements ``[start, end)`` of a flattened parameter from its checkpoint tensor(s).

    A parameter stored as it is is range-read. A fused one (``slot.view``: MoE experts) whose
    checkpoint tensors are each a contiguous run of its flat elements (an expert's rows of
    ``gate_up_proj``, say) is assembled from range reads of just the runs that overlap
    ``[start, end)``: a rank reads its slice, not the parameter. Other views (a transposed
    layout) are assembled into one transient copy of the parameter, one checkpoint tensor at
    a time, of which the slice is returned.
    """
    if slots[0].view is None:
        return _load_weight(spec, storage, checkpoint.tensors[slots[0].name], slots[0].name, start, end)
    spans = [_flat_span(slot) for slot in slots]
    if all(span is not None for span in spans):
        out = torch.empty(end - start, dtype=DTYPES[checkpoint.tensors[slots[0].name].info.dtype][0])
        for slot, (lo, hi) in zip(slots, spans, strict=True):  # the views cover the parameter once
            a, b = max(lo, start), min(hi, end)
            if a < b:
                out[a - start: b - start].copy_(_load_weight(spec, storage, checkpoint.tensors[slot.name], slot.name,
                                                             a - lo, b - lo))
        return out
    full = None
    for slot in slots:
        ref = checkpoint.tensors[slot.name]
        piece = _load_weight(spec, storage, ref, slot.name, 0, ref.info.numel).view(slot.shape)
        if full is None:
            full = torch.empty(numel, dtype=piece.dtype)
        offset, strides = slot.view
        torch.as_strided(full, slot.shape, strides, offset).copy_(piece)
    return full[start:end].clone()


def _flat_span(slot: TensorSlot) -> tuple[int, int] | None:
    """``[first, end)`` of the flat parameter elements that ``slot``'s view covers, if they
    are one contiguous run in the tensor's own row-major order; else None."""
    assert slot.view is not None
    offset, strides = slot.view
    expected, step = [], 1
    for n in reversed(slot.shape):
        expected.append(step)
        step *= n
    if any(n != 1 and got != want for n, got, want in zip(slot.shape, strides, reversed(expected), strict=True)):
        return None
    return offset, offset + math.prod(slot.shape)


def _finish(spec: PartSpec, acc: dict[str, torch.Tensor], counts: Counts, *, dist: Any, rank: int,
            world: int, node: str | None = None) -> dict[str, Any]:
    """Sum the counts over the group, write the part's shards, then (rank 0) its index and marker."""
    storage = Storage(spec.storage_options)
    totals = torch.tensor([counts.examples, counts.targets, counts.tokens], dtype=torch.int64)
    rss = torch.zeros(world, dtype=torch.int64)
    rss[rank] = peak_rss_bytes()
    nodes, memory = [node], [counts.memory]
    if world > 1:
        dist.all_reduce(totals)
        dist.all_reduce(rss)
        nodes, memory = [None] * world, [None] * world
        dist.all_gather_object(nodes, node)
        dist.all_gather_object(memory, counts.memory)
    _write_part(spec, storage, dist, acc, rank=rank, world=world)
    if world > 1:
        dist.barrier()
    result = {"part": spec.part, "num_examples": int(totals[0]), "num_targets": int(totals[1]),
              "num_tokens": int(totals[2]), "compute_s": round(counts.compute_s, 3),
              "peak_rss_bytes": [int(x) for x in rss], "engine": spec.engine, "nodes": nodes,
              "memory": memory}
    if rank == 0:
        index = {"metadata": {"total_size": sum(4 * math.prod(s.shape) for s in spec.slots)},
                 "weight_map": {s.name: spec.files[s.owner] for s in spec.slots}}
        storage.write_bytes(join(spec.url, "fisher.safetensors.index.json"), json.dumps(index, indent=2).encode())
        marker = {**result, "job_id": spec.job_id,
                  "examples": [spec.examples[0].index, spec.examples[-1].index] if spec.examples else None}
        storage.write_bytes(join(spec.url, PART_MARKER), json.dumps(marker, indent=2).encode())
    return result


def _write_part(spec: PartSpec, storage: Storage, dist: Any, acc: dict[str, torch.Tensor], *, rank: int,
                world: int) -> None:
    """Gather each statistics tensor to the rank that owns it, which streams it into its shard.

    Every rank walks the same tensors in the same order (owner by owner, each shard in
    safetensors order), so the collectives pair up; a rank holds at most one gathered tensor.
    """
    by_owner: dict[int, list[TensorSlot]] = {}
    for slot in spec.slots:
        by_owner.setdefault(slot.owner, []).append(slot)
    for owner in sorted(by_owner):
        slots = {s.name: s for s in by_owner[owner]}
        entries = order_for_writing([(s.name, "F32", s.shape) for s in slots.values()])
        mine = rank == owner
        writer = ShardWriter(storage, join(spec.url, spec.files[owner]), entries) if mine else contextlib.nullcontext()
        with writer:
            for name, _, shape in entries:
                slot = slots[name]
                numel = math.prod(shape)
                if slot.param is None:  # a stored buffer: no gradient
                    full = torch.zeros(shape, dtype=torch.float32) if mine else None
                elif world == 1:
                    full = _cut(acc[slot.param].cpu(), slot, numel, shape)
                elif slot.view is not None and (span := _flat_span(slot)) is not None:
                    # one expert's contiguous run of a fused parameter: each rank adds in the part
                    # of it that it holds (zeros elsewhere; sums of squares have no -0.0), so the
                    # owner gets the run alone, not the whole fused parameter once per expert
                    local = acc[slot.param]
                    per = local.numel()
                    lo, hi = span
                    run = torch.zeros(hi - lo, dtype=torch.float32, device=local.device)
                    a, b = max(lo, rank * per), min(hi, (rank + 1) * per)
                    if a < b:
                        run[a - lo: b - lo].copy_(local[a - rank * per: b - rank * per])
                    dist.reduce(run, dst=owner)
                    full = run.view(shape).cpu() if mine else None
                else:
                    # on the accumulators' device (gloo: CPU, nccl: CUDA); the pieces land in one
                    # tensor, so there is no second full-size copy to concatenate them
                    local = acc[slot.param]
                    flat = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device) if mine else None
                    dist.gather(local, gather_list=list(flat.split(local.numel())) if mine else None, dst=owner)
                    full = _cut(flat.cpu(), slot, numel, shape) if mine else None
                if mine:
                    if not spec.allow_nonfinite and slot.param is not None:
                        check_finite(full, f"statistics of part {spec.part} ({spec.examples_text()})", name,
                                     note="the squared gradients overflowed float32 or an example's gradient is "
                                          "non-finite (its loss was finite)")
                    writer.write(name, full)


def _cut(flat: torch.Tensor, slot: TensorSlot, numel: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The statistics of checkpoint tensor ``slot`` from its parameter's flat statistics:
    the tensor itself, or its strided view of a fused parameter (squares are elementwise)."""
    if slot.view is None:
        return flat[:numel].view(shape)
    offset, strides = slot.view
    return torch.as_strided(flat, shape, strides, offset).contiguous()
