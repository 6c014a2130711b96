"""The Fisher job: what ``sar-dist fisher`` computes, validated before anything runs.

``FisherJob.from_dict`` checks keys, types and ranges and raises one ``ValueError`` naming the
file and key; everything that needs the model or the data is checked by the planner
(``sar_dist.fisher.plan``), still before any worker starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sar_dist.config import DEFAULT_MAX_SHARD_BYTES, _check_no_secrets, _opt_url, parse_size
from sar_dist.storage import check_no_userinfo

ESTIMATORS = ("empirical", "sampled")
OVERLENGTH = ("truncate", "refuse")
DEVICES = ("cpu", "cuda")
PARAM_DTYPES = ("float32", "bfloat16")
STATS_DTYPES = ("float32", "bfloat16")  # dtype of the committed statistics (sums are float32 either way)
CHAT_TARGETS = ("last", "all")

# DeepSpeed keys the stage owns: exact per-example statistics need micro-batch 1, no
# accumulation inside DeepSpeed, ZeRO stage 3 and an optimizer that never steps
_OWNED_DS_KEYS = {
    "train_batch_size": "the stage runs one example per rank per step",
    "train_micro_batch_size_per_gpu": "the stage runs one example per rank per step (exact per-example statistics)",
    "gradient_accumulation_steps": "the stage accumulates squared gradients itself, in float32",
    "optimizer": "the stage never steps an optimizer (statistics are taken at the given weights)",
    "scheduler": "the stage never steps an optimizer",
    "fp16": "set 'dtype' (float32 or bfloat16) instead",
    "bf16": "set 'dtype' (float32 or bfloat16) instead",
    "data_types": "squared gradients are accumulated in float32",
}


@dataclass(frozen=True, kw_only=True)
class FisherJob:
    """A validated Fisher config (YAML keys = field names).

    Attributes:
        model: checkpoint directory (safetensors + config.json).
        data: JSONL of ``{"prompt","response"}``, ``{"text"}`` or ``{"input_ids","labels"?}``.
        output: statistics directory.
        tokenizer: directory with ``tokenizer.json`` (default: ``model``); text data only.
        num_examples: use at most this many examples (default: all).
        max_length: tokens per example; longer records are truncated or refused.
        overlength: ``truncate`` (keep the first ``max_length`` tokens, counted and warned)
            or ``refuse`` (exit 2 naming the line).
        estimator: ``empirical`` (the data's targets) or ``sampled`` (targets drawn from the
            model, keyed by ``seed``).
        groups: data-parallel groups (each writes one part).
        ranks_per_group: ZeRO-3 ranks sharing one copy of the model inside a group.
        deepspeed: a DeepSpeed config merged into ours (e.g. ``zero_optimization`` tuning).
        device: ``cpu`` (gloo) or ``cuda`` (nccl, one GPU per rank).
        dtype: parameter dtype of the sharded model (``float32`` default; statistics are
            accumulated in float32 either way).
        stats_dtype: dtype the committed statistics are stored in: ``float32`` (default) or
            ``bfloat16`` (half the bytes a merge reads). Parts and the reduce sum in float32
            either way; only the final reduced sums are rounded (to nearest even).
        cpus_per_rank: CPUs each rank asks Ray for (default: the cluster's CPUs spread over
            all ranks, at least 1).
        seed: keys the ``sampled`` estimator's draws.
        out_shard_size: target size of the statistics shards.
        keep_parts: keep ``parts/`` after the final statistics are written.
        max_retries: times a group is restarted after it fails (a lost worker, a crash).
        timeout_s: collective timeout inside a group.
        storage_options: fsspec options (never credentials).
        chat_template: overrides the tokenizer's chat template for chat records: a Jinja string or
            the URL of a ``.jinja`` file (default: the tokenizer's, from tokenizer_config.json or
            chat_template.jinja).
        chat_targets: ``last`` (default) or ``all`` assistant turns of ``{"messages"}`` records.
        prompt_key: the field (parquet column) holding ``prompt`` (default ``prompt``).
        response_key: the field holding ``response`` (default ``response``).
        messages_key: the field holding ``messages`` (default ``messages``).
        allow_nonfinite: accept NaN/inf weights, losses and statistics (default: stop with exit 2
            naming the tensor or example). Changes no statistic, so not part of the job's identity.
    """

    model: str
    data: str
    output: str
    tokenizer: str | None = None
    num_examples: int | None = None
    max_length: int = 2048
    overlength: str = "truncate"
    estimator: str = "empirical"
    groups: int = 1
    ranks_per_group: int = 1
    deepspeed: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    stats_dtype: str = "float32"
    cpus_per_rank: int | None = None
    seed: int = 0
    out_shard_size: int = DEFAULT_MAX_SHARD_BYTES
    keep_parts: bool = False
    max_retries: int = 2
    timeout_s: float = 1800.0
    storage_options: dict[str, Any] = field(default_factory=dict)
    allow_nonfinite: bool = False
    chat_template: str | None = None
    chat_targets: str = "last"
    prompt_key: str | None = None
    response_key: str | None = None
    messages_key: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, where: str = "config", **overrides: Any) -> FisherJob:
        """Validate a config mapping (YAML) with CLI overrides (None values are ignored).

        Raises:
            ValueError: one line naming ``where`` and the key.
        """
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a mapping of Fisher settings, got {type(d).__name__}")
        raw = {**d, **{k: v for k, v in overrides.items() if v is not None}}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
        for key in ("model", "data", "output"):
            if not raw.get(key):
                raise ValueError(f"{where}: '{key}' is required")
        out: dict[str, Any] = {}
        for key in ("model", "data", "output", "tokenizer"):
            out[key] = _opt_url(raw.get(key), f"{where}.{key}")
        for key, low in (("num_examples", 1), ("max_length", 2), ("groups", 1), ("ranks_per_group", 1),
                         ("cpus_per_rank", 1), ("max_retries", 0)):
            if key in raw and raw[key] is not None:
                out[key] = _int(raw[key], low, f"{where}.{key}")
        if "seed" in raw:
            out["seed"] = _int(raw["seed"], 0, f"{where}.seed")
        for key in ("chat_template", "prompt_key", "response_key", "messages_key"):
            if raw.get(key) is not None:
                if not isinstance(raw[key], str) or not raw[key]:
                    raise ValueError(f"{where}.{key}: expected a non-empty string")
                if key == "chat_template":
                    check_no_userinfo(raw[key], f"{where}.{key}")  # a .jinja URL
                out[key] = raw[key]
        for key, choices in (("estimator", ESTIMATORS), ("overlength", OVERLENGTH), ("device", DEVICES),
                             ("dtype", PARAM_DTYPES), ("stats_dtype", STATS_DTYPES),
                             ("chat_targets", CHAT_TARGETS)):
            if key in raw:
                if raw[key] not in choices:
                    raise ValueError(f"{where}.{key}: {raw[key]!r} is not one of {', '.join(choices)}")
                out[key] = raw[key]
        if "out_shard_size" in raw:
            out["out_shard_size"] = parse_size(raw["out_shard_size"], f"{where}.out_shard_size")
        if "keep_parts" in raw:
            if not isinstance(raw["keep_parts"], bool):
                raise ValueError(f"{where}.keep_parts: expected true or false")
            out["keep_parts"] = raw["keep_parts"]
        if "allow_nonfinite" in raw:
            if not isinstance(raw["allow_nonfinite"], bool):
                raise ValueError(f"{where}.allow_nonfinite: expected true or false")
            out["allow_nonfinite"] = raw["allow_nonfinite"]
        if "timeout_s" in raw:
            t = raw["timeout_s"]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
                raise ValueError(f"{where}.timeout_s: expected a positive number of seconds")
            out["timeout_s"] = float(t)
        opts = raw.get("storage_options") or {}
        if not isinstance(opts, Mapping):
            raise ValueError(f"{where}.storage_options: expected a mapping")
        _check_no_secrets(opts, f"{where}.storage_options")
        out["storage_options"] = dict(opts)
        ds = raw.get("deepspeed") or {}
        if not isinstance(ds, Mapping):
            raise ValueError(f"{where}.deepspeed: expected a mapping (a DeepSpeed config)")
        for key, why in _OWNED_DS_KEYS.items():
            if key in ds:
                raise ValueError(f"{where}.deepspeed.{key}: set by sar-dist ({why})")
        stage = (ds.get("zero_optimization") or {}).get("stage", 3)
        if stage != 3:
            raise ValueError(f"{where}.deepspeed.zero_optimization.stage: must be 3 (the model is sharded), got {stage!r}")
        out["deepspeed"] = dict(ds)
        if out.get("device", "cpu") == "cpu" and (ds.get("zero_optimization") or {}).get("offload_param"):
            raise ValueError(f"{where}.deepspeed.zero_optimization.offload_param: the model is already on the CPU")
        return cls(**out)

    @property
    def engine(self) -> str:
        """``deepspeed`` for groups of several ranks, or when a ``deepspeed`` config is given
        (e.g. to offload); ``torch`` for one-rank groups otherwise: ZeRO-3 over one rank
        shards nothing and costs a gloo reduce-scatter of every gradient."""
        return "deepspeed" if self.ranks_per_group > 1 or self.deepspeed else "torch"

    def deepspeed_config(self, hidden_size: int | None = None) -> dict[str, Any]:
        """Our DeepSpeed config with the user's merged in (theirs wins where allowed).

        ZeRO-3's bucket sizes default to the model-scaled values of Hugging Face's DeepSpeed
        integration ("auto": reduce bucket hidden**2 elements, prefetch bucket 0.9 * hidden**2,
        persistence threshold 10 * hidden) instead of DeepSpeed's fixed 5e8-element reduce
        bucket: with one example per step the whole gradient goes through that bucket, and
        on CPU (gloo) the fixed size cost 27% more time and up to 1.2 GiB more per rank on a 121M
        model (bench/README.md).

        How much of the model a rank keeps gathered is bounded the same way: DeepSpeed keeps a
        gathered parameter until ``stage3_max_reuse_distance`` elements (default 1e9) have gone
        by without its reuse, and prefetches up to ``stage3_max_live_parameters`` (1e9). Both
        exceed models of up to a billion parameters, so a rank held the whole model gathered
        and its peak did not fall with ranks (bench/README.md, "Fisher memory per rank"). Both
        are set to the prefetch bucket: a rank holds about the layer it runs and the next.

        The engine is built without an optimizer (``worker.py``), so no optimizer settings.
        """
        zero: dict[str, Any] = {"stage": 3}
        if hidden_size:
            bucket = int(0.9 * hidden_size * hidden_size)
            zero.update(reduce_bucket_size=hidden_size * hidden_size,
                        stage3_prefetch_bucket_size=bucket,
                        stage3_max_live_parameters=bucket,
                        stage3_max_reuse_distance=bucket,
                        stage3_param_persistence_threshold=10 * hidden_size)
        ours: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": zero,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        if self.dtype == "bfloat16":
            ours["bf16"] = {"enabled": True}
        return _deep_merge(ours, self.deepspeed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _int(value: Any, low: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}: expected an integer >= {low}, got {value!r}")
    return value
