"""Plan a Fisher job from headers, config.json and the data, before any worker starts.

Everything that can be wrong with the input is found here (exit 2, nothing written): a
model without safetensors or config.json, a model class transformers does not know, model
parameters the checkpoint lacks (checked on a meta-device copy of the model: no weights are
read), the data (line by line), a missing tokenizer. The plan fixes which examples each
group takes, which rank writes which statistics tensor, the final shard layout and the
job's identity (``job_id``), which decides whether parts on storage can be reused.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from sar_dist.checkpoint.format import DTYPE_NAMES, DTYPES, pack_in_order
from sar_dist.checkpoint.index import CheckpointIndex, content_fingerprint, open_checkpoint, read_json
from sar_dist.fisher.config import FisherJob
from sar_dist.fisher.data import CalibrationData, load_examples
from sar_dist.fisher.mapping import ParamView, checkpoint_views
from sar_dist.fisher.types import PartSpec, TensorSlot
from sar_dist.storage import Storage, display_url, join

FORMAT_VERSION = 1
STATS_STEM = "fisher"
MANIFEST = "fisher.json"  # written last: its presence means the statistics are complete
PARTS_DIR = "parts"


@dataclass(frozen=True, kw_only=True)
class FisherPlan:
    """A validated job, ready to run.

    Attributes:
        job: the config.
        storage: where to read and write.
        checkpoint: the model's headers.
        model_config: its ``config.json``.
        data: the tokenized examples.
        parts: one per group.
        shards: final statistics shards: file name -> tensor names, in checkpoint order.
        job_id: sha256 over everything the statistics depend on.
        tied: checkpoint tensor name -> the parameter it shares (tied embeddings).
        model_content: the model's sampled content fingerprint (``content_fingerprint``).
    """

    job: FisherJob
    storage: Storage
    checkpoint: CheckpointIndex
    model_config: dict[str, Any]
    data: CalibrationData
    parts: tuple[PartSpec, ...]
    shards: dict[str, list[str]]
    job_id: str
    tied: dict[str, str]
    model_content: str

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: r.info.shape for n, r in self.checkpoint.tensors.items()}


def model_parameters(model_config: dict[str, Any], where: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Parameter names and shapes of the model ``config.json`` describes, built on the meta
    device (no memory, no weights), and the tied aliases (alias -> canonical name).

    Raises:
        ValueError: unknown ``model_type`` or a class transformers cannot build.
    """
    import transformers

    config = dict(model_config)
    model_type = config.pop("model_type", None)
    if not model_type:
        raise ValueError(f"{where}: config.json has no 'model_type'")
    try:
        config_obj = transformers.AutoConfig.for_model(model_type, **config)
        model_cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config_obj)]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{where}: transformers has no causal LM for model_type {model_type!r} ({e})") from None
    model = _meta_model(model_cls, config_obj)
    canonical = {id(p): n for n, p in model.named_parameters()}
    names: dict[str, tuple[int, ...]] = {}
    tied: dict[str, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names[n] = tuple(p.shape)
        if canonical[id(p)] != n:
            tied[n] = canonical[id(p)]
    return names, tied


def _meta_model(model_cls: Any, config_obj: Any) -> Any:
    import torch

    with torch.device("meta"):
        return model_cls._from_config(config_obj)


def fused_views(model_config: dict[str, Any], where: str) -> dict[str, ParamView]:
    """Checkpoint tensors that are views of fused parameters (``mapping.checkpoint_views``)."""
    import transformers

    config = dict(model_config)
    config_obj = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    model = _meta_model(transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config_obj)], config_obj)
    return checkpoint_views(model, where)


def build_fisher_plan(job: FisherJob) -> FisherPlan:
    """Validate the model, tokenizer and data, and lay out parts and shards.

    Raises:
        ValueError: bad input, one line naming the file (and line or tensor).
    """
    storage = Storage(job.storage_options)
    checkpoint = open_checkpoint(storage, job.model, what="model")
    where = display_url(job.model)
    model_config = read_json(storage, join(job.model, "config.json"))
    if model_config is None:
        raise ValueError(f"model {where}: no config.json (needed to build the model for the Fisher pass)")
    params, tied = model_parameters(model_config, f"model {where}")
    views = fused_views(model_config, where) if any(n not in params for n in checkpoint.tensors) else {}

    # every checkpoint tensor gets statistics; every parameter must come from the checkpoint
    slots_param: dict[str, str | None] = {}
    slots_view: dict[str, tuple[int, tuple[int, ...]]] = {}
    fused_elements: dict[str, int] = {}
    for name, ref in checkpoint.tensors.items():
        if name in views and name not in params:
            view = views[name]
            if tuple(ref.info.shape) != view.shape:
                raise ValueError(f"model {where}: tensor '{name}' has shape {list(ref.info.shape)}, "
                                 f"its config.json builds {list(view.shape)} (part of '{view.param}')")
            if not ref.info.torch_dtype.is_floating_point:
                raise ValueError(f"model {where}: parameter '{name}' is stored as {ref.info.dtype}, not a float")
            slots_param[name] = view.param
            slots_view[name] = (view.offset, view.strides)
            fused_elements[view.param] = fused_elements.get(view.param, 0) + ref.info.numel
        elif name in params:
            if tuple(ref.info.shape) != params[name]:
                raise ValueError(f"model {where}: tensor '{name}' has shape {list(ref.info.shape)}, "
                                 f"its config.json builds {list(params[name])}")
            if not ref.info.torch_dtype.is_floating_point:
                raise ValueError(f"model {where}: parameter '{name}' is stored as {ref.info.dtype}, not a float")
            slots_param[name] = tied.get(name, name)
        else:
            slots_param[name] = None  # a stored buffer: zeros
    # a fused parameter is covered when all of its checkpoint tensors are there
    covered = {p for n, p in slots_param.items() if p is not None and n not in slots_view}
    covered |= {p for p, k in fused_elements.items() if k == math.prod(params[p])}
    missing = [n for n in params if tied.get(n, n) not in covered]
    if missing:
        raise ValueError(f"model {where}: parameter '{missing[0]}' of the model class has no tensor in the checkpoint")

    vocab = int(model_config.get("vocab_size") or 0)
    if vocab <= 0:
        raise ValueError(f"model {where}: config.json has no vocab_size")
    data = load_examples(storage, job.data, vocab_size=vocab, max_length=job.max_length, overlength=job.overlength,
                         num_examples=job.num_examples, tokenizer_url=job.tokenizer or job.model,
                         chat_template=job.chat_template, chat_targets=job.chat_targets, prompt_key=job.prompt_key,
                         response_key=job.response_key, messages_key=job.messages_key)
    if len(data.examples) < job.groups:
        raise ValueError(f"data {display_url(job.data)}: {len(data.examples)} example(s) for {job.groups} groups; "
                         f"use at most as many groups as examples")

    ds_config = job.deepspeed_config(hidden_size=model_config.get("hidden_size"))
    model_content = content_fingerprint(storage, checkpoint)
    job_id = _job_id(job, model_content, data, ds_config)
    world = job.ranks_per_group
    owners = _assign_owners(checkpoint, world)
    files = {r: f"{STATS_STEM}-{r + 1:05d}-of-{world:05d}.safetensors" for r in sorted(set(owners.values()))}
    slots = tuple(
        TensorSlot(name=n, shape=tuple(r.info.shape), param=slots_param[n], owner=owners[n],
                   view=slots_view.get(n))
        for n, r in checkpoint.tensors.items()
    )
    parts = tuple(
        PartSpec(
            part=g,
            url=join(job.output, PARTS_DIR, f"part-{g:05d}"),
            model_url=job.model,
            model_config=model_config,
            storage_options=job.storage_options,
            examples=data.examples[g:: job.groups],
            slots=slots,
            files=files,
            dtype=job.dtype,
            device=job.device,
            estimator=job.estimator,
            seed=job.seed,
            deepspeed=ds_config,
            job_id=job_id,
            timeout_s=job.timeout_s,
            engine=job.engine,
        )
        for g in range(job.groups)
    )
    return FisherPlan(job=job, storage=storage, checkpoint=checkpoint, model_config=model_config, data=data,
                      parts=parts, job_id=job_id, tied=tied,
                      shards=_pack_shards(checkpoint, job.out_shard_size, DTYPES[DTYPE_NAMES[job.stats_dtype]][1]),
                      model_content=model_content)


def _assign_owners(checkpoint: CheckpointIndex, world: int) -> dict[str, int]:
    """Each tensor to the rank with the fewest statistics bytes so far (ties: lowest rank)."""
    load = [0] * world
    owners = {}
    for name, ref in checkpoint.tensors.items():
        r = min(range(world), key=lambda i: (load[i], i))
        owners[name] = r
        load[r] += 4 * ref.info.numel
    return owners


def _pack_shards(checkpoint: CheckpointIndex, max_bytes: int, itemsize: int = 4) -> dict[str, list[str]]:
    groups = pack_in_order([(name, itemsize * ref.info.numel) for name, ref in checkpoint.tensors.items()], max_bytes)
    total = len(groups)
    return {f"{STATS_STEM}-{i + 1:05d}-of-{total:05d}.safetensors": names for i, names in enumerate(groups)}


def _job_id(job: FisherJob, model_content: str, data: CalibrationData, ds_config: dict[str, Any]) -> str:
    """Everything the statistics depend on; parts from another job are never reused."""
    ident = {
        "format_version": FORMAT_VERSION,
        "model": model_content,
        "data": data.sha256,
        "tokenizer": data.tokenizer_sha256,
        "num_examples": len(data.examples),
        "max_length": job.max_length,
        "overlength": job.overlength,
        "estimator": job.estimator,
        "seed": job.seed,
        "dtype": job.dtype,
        "groups": job.groups,
        "ranks_per_group": job.ranks_per_group,
        "device": job.device,
        "engine": job.engine,
        "deepspeed": ds_config,
    }
    # what decides the tokens of chat and remapped records (absent otherwise: earlier job ids hold)
    if data.chat_template_sha256 is not None:
        ident["chat_template"] = data.chat_template_sha256
        ident["chat_targets"] = job.chat_targets
    keys = {k: getattr(job, k) for k in ("prompt_key", "response_key", "messages_key") if getattr(job, k)}
    if keys:
        ident["keys"] = keys
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def part_is_complete(storage: Storage, part: PartSpec) -> dict[str, Any] | None:
    """The part's marker if it was finished by this same job, else None."""
    marker = read_json(storage, join(part.url, "part.json"))
    if marker is None or marker.get("job_id") != part.job_id:
        return None
    return marker

