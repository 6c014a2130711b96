"""Read Fisher statistics for a merge, and refuse statistics that belong to another model.

A statistics directory is complete only when ``fisher.json`` is there (it is written last).
The merge stage opens one per fine-tuned model and checks, from headers, that manifest and a
few sampled blocks of the model, that it was computed for exactly that checkpoint (its content
fingerprint: fine-tunes of one base share their headers), with a
tensor of the same shape for every tensor of the model and nothing else, all in the dtype
``fisher.json`` records as ``stats_dtype`` (float32, the default, or bfloat16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sar_dist.checkpoint.format import DTYPE_NAMES
from sar_dist.checkpoint.index import CheckpointIndex, content_fingerprint, layout_problems, open_checkpoint, read_json
from sar_dist.fisher.config import STATS_DTYPES
from sar_dist.fisher.plan import FORMAT_VERSION, MANIFEST, STATS_STEM
from sar_dist.storage import Storage, display_url, join


@dataclass(frozen=True, kw_only=True)
class FisherStats:
    """Validated statistics of one model.

    Attributes:
        index: the statistics tensors (sums over examples, float32 or bfloat16).
        manifest: ``fisher.json``.
    """

    index: CheckpointIndex
    manifest: dict[str, Any]

    @property
    def num_examples(self) -> int:
        return int(self.manifest["num_examples"])

    @property
    def l2_norm_mean(self) -> float:
        """Global L2 norm of the mean statistics (sum / num_examples) over all tensors."""
        return float(self.manifest["l2_norm_mean"])


def open_fisher(storage: Storage, url: str, model: CheckpointIndex) -> FisherStats:
    """Open the statistics at ``url`` for the checkpoint ``model``.

    Raises:
        ValueError: incomplete statistics, or statistics of another model (one line naming
            both), or a tensor missing, extra, of another shape or not of the recorded
            ``stats_dtype``.
    """
    where = f"fisher statistics {display_url(url)}"
    index = open_checkpoint(storage, url, stem=STATS_STEM, what="fisher statistics")
    manifest = read_json(storage, join(url, MANIFEST))
    if manifest is None:
        raise ValueError(f"{where}: no {MANIFEST} (incomplete: rerun `sar-dist fisher` to finish it)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where}: format_version {manifest.get('format_version')!r}, this sar-dist reads {FORMAT_VERSION}")
    num = manifest.get("num_examples")
    if not isinstance(num, int) or num <= 0:
        raise ValueError(f"{where}: {MANIFEST} has no positive num_examples")
    recorded = manifest.get("model") or {}
    theirs, ours = recorded.get("content_fingerprint"), content_fingerprint(storage, model)
    if theirs != ours:
        raise ValueError(
            f"{where} were computed for model {recorded.get('url')!s} (fingerprint "
            f"{str(theirs)[:12]}), not for model {display_url(model.url)} (fingerprint {ours[:12]})"
        )
    problems = layout_problems(f"model {display_url(model.url)}", model, index, "fisher statistics", dtypes=False)
    stats_dtype = manifest.get("stats_dtype", "float32")  # absent: written before stats_dtype existed
    want = DTYPE_NAMES.get(stats_dtype) if stats_dtype in STATS_DTYPES else None
    if want is None:
        raise ValueError(f"{where}: {MANIFEST} has stats_dtype {stats_dtype!r}; this sar-dist reads "
                         f"float32 or bfloat16")
    problems += [f"{display_url(f.file)}: tensor '{n}' is {f.info.dtype}; {MANIFEST} says {want} "
                 f"(stats_dtype {stats_dtype})" for n, f in index.tensors.items() if f.info.dtype != want]
    if problems:
        raise ValueError(problems[0])
    return FisherStats(index=index, manifest=manifest)
