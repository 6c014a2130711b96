"""The pipeline file: validated into one FisherJob per model that needs statistics and one MergeJob.

Every check of a stage's own settings is that stage's (``FisherJob.from_dict``,
``MergeJob.from_dict``); this module only checks the pipeline's own keys and composes them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sar_dist.config import MergeJob, _check_no_secrets, _opt_url, load_yaml
from sar_dist.fisher.config import FisherJob
from sar_dist.storage import join

_TOP_KEYS = {"base_model", "models", "fisher", "merge", "statistics", "output", "analyze", "storage_options"}
_MODEL_KEYS = {"name", "model", "data", "statistics", "fisher", "parameters"}
_ANALYZE_KEYS = {"output", "tolerance", "rank_fraction", "svd"}
# keys the pipeline sets in each stage's config itself
_FISHER_OWNED = {"model", "data", "output", "storage_options"}
_MERGE_OWNED = {"base_model", "models", "output", "storage_options"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """One fine-tune: its statistics URL, and the Fisher job computing them (None: reused)."""

    name: str
    model: str
    statistics: str
    fisher: FisherJob | None


@dataclass(frozen=True, kw_only=True)
class PipelineJob:
    """A validated pipeline file."""

    where: str
    models: tuple[ModelEntry, ...]
    merge: MergeJob
    analyze: dict[str, Any] | None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def entry(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise ValueError(f"{self.where}: --model {name!r} is not in the file (models: "
                         f"{', '.join(m.name for m in self.models)})")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
    return dict(value)


def _no_owned(d: Mapping[str, Any], owned: set[str], where: str) -> None:
    for key in sorted(owned & set(d)):
        raise ValueError(f"{where}.{key}: set by the pipeline file itself (remove it here)")


def load_pipeline(path: str, *, storage_options: dict[str, Any] | None = None) -> PipelineJob:
    """Read and validate ``path``; ``storage_options`` (from the CLI) replaces the file's.

    Raises:
        ValueError: one line naming the file and key.
    """
    return pipeline_from_dict(load_yaml(path), where=path, storage_options=storage_options)


def pipeline_from_dict(d: Any, *, where: str, storage_options: dict[str, Any] | None = None) -> PipelineJob:
    """Validate a parsed pipeline file (see ``configs/pipeline/demo.yaml``)."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping of pipeline settings, got {type(d).__name__}")
    unknown = sorted(set(d) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(_TOP_KEYS))})")
    for key in ("base_model", "models", "merge", "output"):
        if not d.get(key):
            raise ValueError(f"{where}: '{key}' is required")
    opts = _mapping(d.get("storage_options"), f"{where}.storage_options")
    if storage_options is not None:
        opts = dict(storage_options)
    _check_no_secrets(opts, f"{where}.storage_options")
    shared = _mapping(d.get("fisher"), f"{where}.fisher")
    _no_owned(shared, _FISHER_OWNED, f"{where}.fisher")
    root = _opt_url(d.get("statistics"), f"{where}.statistics")
    models = d["models"]
    if not isinstance(models, list) or not models:
        raise ValueError(f"{where}.models: expected a non-empty list of models")
    entries: list[ModelEntry] = []
    merge_models: list[dict[str, Any]] = []
    for i, m in enumerate(models):
        at = f"{where}.models[{i}]"
        if not isinstance(m, Mapping):
            raise ValueError(f"{at}: expected a mapping with name, model and data or statistics")
        bad = sorted(set(m) - _MODEL_KEYS)
        if bad:
            raise ValueError(f"{at}: unknown key '{bad[0]}' (known: {', '.join(sorted(_MODEL_KEYS))})")
        name = m.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{at}.name: expected a name of letters, digits, '.', '_' or '-', got {name!r}")
        if any(e.name == name for e in entries):
            raise ValueError(f"{at}.name: {name!r} is listed twice")
        if not m.get("model"):
            raise ValueError(f"{at}: 'model' is required")
        has_data, has_stats = bool(m.get("data")), bool(m.get("statistics"))
        if has_data == has_stats:
            raise ValueError(f"{at}: give exactly one of 'data' (statistics are computed) or 'statistics' "
                             f"(existing ones are reused)")
        fisher: FisherJob | None = None
        if has_stats:
            if m.get("fisher"):
                raise ValueError(f"{at}.fisher: the model reuses existing statistics; nothing to override")
            stats = _opt_url(m["statistics"], f"{at}.statistics")
        else:
            if root is None:
                raise ValueError(f"{where}: 'statistics' (where computed statistics go) is required when "
                                 f"models[{i}] gives 'data'")
            own = _mapping(m.get("fisher"), f"{at}.fisher")
            _no_owned(own, _FISHER_OWNED, f"{at}.fisher")
            stats = join(root, name)
            fisher = FisherJob.from_dict({**shared, **own}, where=f"{at} ({name})", model=m["model"],
                                         data=m["data"], output=stats, storage_options=opts)
        entries.append(ModelEntry(name=name, model=_opt_url(m["model"], f"{at}.model") or "",
                                  statistics=stats or "", fisher=fisher))
        merge_models.append({"model": m["model"], "fisher": stats,
                             **({"parameters": m["parameters"]} if m.get("parameters") is not None else {})})
    merge = _mapping(d["merge"], f"{where}.merge")
    _no_owned(merge, _MERGE_OWNED, f"{where}.merge")
    job = MergeJob.from_dict({**merge, "base_model": d["base_model"], "models": merge_models,
                              "output": d["output"], "storage_options": opts}, where=f"{where} (merge)")
    analyze = None
    if d.get("analyze") is not None:
        analyze = _mapping(d["analyze"], f"{where}.analyze")
        bad = sorted(set(analyze) - _ANALYZE_KEYS)
        if bad:
            raise ValueError(f"{where}.analyze: unknown key '{bad[0]}' (known: {', '.join(sorted(_ANALYZE_KEYS))})")
        if not analyze.get("output"):
            raise ValueError(f"{where}.analyze: 'output' is required")
        _opt_url(analyze["output"], f"{where}.analyze.output")
    return PipelineJob(where=where, models=tuple(entries), merge=job, analyze=analyze, storage_options=opts)
