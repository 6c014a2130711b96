"""``sar-dist analyze``: the update geometry of fine-tuned models before choosing a merge method.

Split in two like the merge: :func:`prepare_analyze` reads headers only and raises ``ValueError``
for bad input before any tensor data is read or anything is written; :func:`execute_analyze`
runs one task per tensor (small tensors grouped) on Ray or in this process, each returning
sufficient statistics (:mod:`sar_dist.analyze.stats`), sums them per tensor, layer, module and
overall, and writes ``report.md``, the figures and, last, ``report.json`` (its presence means the
report is complete).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sar_dist.analyze.stats import (
    EXACT_SVD_MAX_DIM,
    MODULE_GROUPS,
    SVD_NITER,
    SVD_OVERSAMPLE,
    SVD_SEED,
    Settings,
    TensorJob,
    estimate_bytes,
    module_kind,
    run_group,
)
from sar_dist.checkpoint.index import CheckpointIndex, layout_problems, open_checkpoint, read_json
from sar_dist.output import STATE_DIR, check_disjoint, check_ownership, remove_state, write_claims
from sar_dist.plan.params import layer_index
from sar_dist.storage import Storage, check_no_userinfo, display_url, join

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
FIGURES = ("sparsity_by_layer.png", "overlap_matrix.png", "cosine_matrix.png", "off_principal_by_layer.png")
REPORT_FILES = (REPORT_MD, *FIGURES, REPORT_JSON)
REPORT_KIND = "sar-dist analyze report"
EXECUTORS = ("ray", "local")
SVD_MODES = ("auto", "exact", "randomized")
GROUP_BYTES = 64 * 2**20
"""Small tensors are grouped into one task until the group reads about this many float32 bytes."""
RAY_MAX_RETRIES = 3

DEFINITIONS = {
    "task_vector": "t_k = model_k - base, every value converted to float32 first; sums accumulated in float64",
    "updated": "an entry is updated by model k when |t_k| > tolerance (tolerance 0: its value changed)",
    "density": "updated entries / all entries; sparsity = 1 - density",
    "relative_norm": "||t_k|| / ||base|| (Frobenius norms over the tensors in scope)",
    "jaccard": "|A & B| / |A | B| of the two models' update masks",
    "jaccard_chance": "pq / (p + q - pq), with p = |A|/N and q = |B|/N the densities over the N entries in "
                      "scope: E|A & B| / E|A | B| if the masks were independent",
    "overlap_over_smaller": "|A & B| / min(|A|, |B|)",
    "overlap_over_smaller_chance": "pq / min(p, q) (= max(p, q)): the same for independent masks",
    "expected_intersection": "N p q: E|A & B| for independent masks at densities p, q over the scope",
    "intersection_vs_chance": "|A & B| / (N p q)",
    "expected_intersection_per_tensor": "sum over tensors of |A_t| |B_t| / N_t: E|A & B| for masks independent "
                                        "within each tensor at each tensor's own densities",
    "sign_conflict_rate": "share of the entries of A & B where sign(t_a) != sign(t_b)",
    "cosine": "sum of t_a . t_b / sqrt(sum ||t_a||^2 * sum ||t_b||^2) over the tensors in scope",
    "off_principal_share": "for 2-D tensors with base W = U S V^T and r = max(1, round(rank_fraction * min(m, n))): "
                           "1 - ||U_r^T T V_r||_F^2 / ||T||_F^2, the share of the update's energy outside the "
                           "rank-r principal block of the base (null when T = 0); over several tensors: "
                           "sum of outside energies / sum of energies (2-D tensors only)",
    "svd": f"exact (torch.linalg.svd) when min(m, n) <= {EXACT_SVD_MAX_DIM} under svd=auto, else randomized "
           f"(torch.svd_lowrank, q = r + {SVD_OVERSAMPLE} columns, niter={SVD_NITER}, seed {SVD_SEED})",
    "off_principal_chance": "the off-principal share expected if the update's entries were placed at random "
                            "(independent, zero mean) within each 2-D tensor: 1 - r^2 / (m n) per tensor, "
                            "weighted by the update's energy ||T||_F^2 over several tensors",
    "principal_vs_chance": "(1 - off_principal_share) / (1 - off_principal_chance): the update energy inside the "
                           "principal blocks over what randomly placed updates of the same energy would put there",
    "updated_in_overlap": "entries updated by model k and by at least one other model",
    "fisher_overlap_share": "sum of F_k t_k^2 over entries updated by >= 2 models / sum of F_k t_k^2 over all "
                            "entries, with F_k the mean Fisher (statistics sum / num_examples)",
    "module_groups": "embed_tokens (input embedding), lm_head (output projection, apart even when tied), norm "
                     "(any name part containing 'norm'), router (MoE router/gate: a name part 'router', 'gate' or "
                     "'shared_expert_gate', not gate_proj), experts (under 'experts', 'shared_experts' or "
                     "'shared_expert'), attention (q/k/v/o_proj or under self_attn/attn/attention), mlp "
                     "(gate/up/down_proj or under mlp/feed_forward), other; tested in that order",
}


@dataclass(frozen=True, kw_only=True)
class AnalyzePlan:
    """Validated inputs and the tasks to run."""

    base: str
    models: list[str]
    fisher: list[str] | None
    output: str
    storage_options: dict[str, Any]
    settings: Settings
    groups: list[list[TensorJob]]
    names: list[str]
    fisher_examples: list[int] | None = None
    labels: list[str] = field(default_factory=list)


def _labels(urls: Sequence[str]) -> list[str]:
    raw = [display_url(u).rstrip("/").rsplit("/", 1)[-1] or f"model {i + 1}" for i, u in enumerate(urls)]
    return [f"{r}#{i + 1}" if raw.count(r) > 1 else r for i, r in enumerate(raw)]


def _check_same_tensors(base: CheckpointIndex, model: CheckpointIndex, what: str) -> None:
    # dtypes may differ: every tensor is compared in float32
    problems = layout_problems("the base", base, model, what, dtypes=False)
    if problems:
        raise ValueError(problems[0])


def _group(jobs: Sequence[TensorJob], inputs: int) -> list[list[TensorJob]]:
    groups: list[list[TensorJob]] = []
    size = 0
    for job in jobs:
        n = job.base.info.numel * 4 * inputs
        if not groups or size + n > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += n
    return groups


def prepare_analyze(
    base: str,
    models: Sequence[str],
    output: str,
    *,
    fisher: Sequence[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    tolerance: float = 0.0,
    rank_fraction: float = 0.01,
    svd: str = "auto",
    force: bool = False,
) -> AnalyzePlan:
    """Check every input from headers (Fisher statistics: also their manifests) and plan the tasks.

    Raises:
        ValueError: bad settings, a missing or unreadable input, a tensor name or shape that
            differs between the base and a model, a Fisher count that is not one per model,
            Fisher statistics computed for another model, or an output that is, holds or lies
            inside an input, or holds files sar-dist did not write (without ``force``).
    """
    from sar_dist.config import _check_no_secrets
    from sar_dist.fisher.stats import open_fisher

    options = dict(storage_options or {})
    _check_no_secrets(options, "storage_options")
    models = list(models)
    if not models:
        raise ValueError("analyze needs at least one --model")
    if fisher is not None and len(fisher) == 0:
        fisher = None
    if fisher is not None and len(fisher) != len(models):
        raise ValueError(f"--fisher given {len(fisher)} time(s) for {len(models)} --model(s); give one per model, "
                         f"in the same order")
    if not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"--tolerance must be a finite number >= 0, got {tolerance!r}")
    if not isinstance(rank_fraction, (int, float)) or not 0 < rank_fraction <= 1:
        raise ValueError(f"--rank-fraction must be in (0, 1], got {rank_fraction!r}")
    if svd not in SVD_MODES:
        raise ValueError(f"--svd must be one of {', '.join(SVD_MODES)}, got {svd!r}")
    if not output:
        raise ValueError("--output is required")
    for what, url in [("--base", base), ("--output", output), *(("--model", m) for m in models),
                      *(("--fisher", f) for f in fisher or ())]:
        check_no_userinfo(url, what)
    storage = Storage(options)

    base_index = open_checkpoint(storage, base, what="base model")
    indexes = []
    for i, url in enumerate(models):
        index = open_checkpoint(storage, url, what=f"model {i + 1}")
        _check_same_tensors(base_index, index, f"model {i + 1}")
        indexes.append(index)
    stats = [open_fisher(storage, url, index) for url, index in zip(fisher, indexes, strict=True)] if fisher else None
    inputs = [("the base", base), *((f"model {i + 1}", u) for i, u in enumerate(models)),
              *((f"Fisher statistics {i + 1}", u) for i, u in enumerate(fisher or ()))]
    files = {r.file for ix in [base_index, *indexes, *(s.index for s in stats or ())] for r in ix.tensors.values()}
    check_disjoint(output, [*inputs, *(("input file", f) for f in sorted(files))])
    storage.check_bucket(output)
    earlier = read_json(storage, join(output, REPORT_JSON), strict=False)
    ours = set(REPORT_FILES) if earlier is not None and earlier.get("kind") == REPORT_KIND else set()
    check_ownership(storage, output, REPORT_FILES, ours, force=force)

    jobs = []
    for name, ref in base_index.tensors.items():
        jobs.append(TensorJob(
            name=name, base=ref, models=tuple(ix.tensors[name] for ix in indexes),
            fisher=tuple(s.index.tensors[name] for s in stats) if stats else None,
            fisher_examples=tuple(s.num_examples for s in stats) if stats else None,
        ))
    inputs = 1 + len(models) * (2 if stats else 1)
    return AnalyzePlan(
        base=base, models=models, fisher=list(fisher) if fisher else None, output=output.rstrip("/") or output,
        storage_options=options, settings=Settings(tolerance=float(tolerance), rank_fraction=float(rank_fraction),
                                                   svd=svd),
        groups=_group(jobs, inputs), names=list(base_index.tensors),
        fisher_examples=[s.num_examples for s in stats] if stats else None, labels=_labels(models),
    )


# --------------------------------------------------------------------------- executors


def _ray_group(storage: Storage, jobs: list[TensorJob], settings: Settings, num_threads: int) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(num_threads)
    return run_group(storage, jobs, settings)


def _run_local(plan: AnalyzePlan, on_group: Callable[[int], None]) -> list[list[dict[str, Any]]]:
    storage = Storage(plan.storage_options)
    out = []
    for jobs in plan.groups:
        out.append(run_group(storage, jobs, plan.settings))
        on_group(len(jobs))
    return out


def _run_ray(plan: AnalyzePlan, on_group: Callable[[int], None], address: str | None,
             num_cpus: int | None) -> list[list[dict[str, Any]]]:
    import ray

    from sar_dist.execute.ray_executor import RETRY_EXCEPTIONS, cpus_per_task, ensure_ray

    started = ensure_ray(address, num_cpus)
    try:
        storage = Storage(plan.storage_options)
        remote = ray.remote(_ray_group)
        threads = cpus_per_task(len(plan.groups))
        # never ask for more memory than the largest node has, or the task could never be scheduled
        largest = max((int(n["Resources"].get("memory", 0)) for n in ray.nodes() if n.get("Alive")), default=0)
        pending = {}
        for i, jobs in enumerate(plan.groups):
            need = max(estimate_bytes(job) for job in jobs)
            memory = min(need, largest) if largest else None
            ref = remote.options(name=f"sar-dist:analyze:{jobs[0].name}", num_cpus=threads, memory=memory,
                                 max_retries=RAY_MAX_RETRIES, retry_exceptions=RETRY_EXCEPTIONS,
                                 ).remote(storage, jobs, plan.settings, threads)
            pending[ref] = i
        results: dict[int, list[dict[str, Any]]] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    for other in pending:
                        ray.cancel(other)
                    cause = e.cause if isinstance(e.cause, BaseException) else e
                    raise cause from None
                on_group(len(plan.groups[i]))
        return [results[i] for i in range(len(plan.groups))]
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------- aggregation


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class _Sums:
    """Additive statistics of a set of tensors, per model and per pair."""

    def __init__(self, k: int, fisher: bool):
        self.k, self.fisher = k, fisher
        self.tensors = 0
        self.numel = 0
        self.base_sumsq = 0.0
        self.updated = [0] * k
        self.sumsq = [0.0] * k
        self.in_overlap = [0] * k
        self.energy_2d = [0.0] * k
        self.outside = [0.0] * k
        self.inside_chance = [0.0] * k
        self.svd_tensors = 0
        self.sens_total = [0.0] * k
        self.sens_overlap = [0.0] * k
        npairs = k * (k - 1) // 2
        self.intersection = [0] * npairs
        self.conflicts = [0] * npairs
        self.dot = [0.0] * npairs
        self.expected_per_tensor = [0.0] * npairs
        self.pair_ix = [(a, b) for a in range(k) for b in range(a + 1, k)]

    def add(self, raw: dict[str, Any]) -> None:
        n = raw["numel"]
        self.tensors += 1
        self.numel += n
        self.base_sumsq += raw["base_sumsq"]
        if raw["svd"] is not None:
            self.svd_tensors += 1
        for i, m in enumerate(raw["models"]):
            self.updated[i] += m["updated"]
            self.sumsq[i] += m["sumsq"]
            self.in_overlap[i] += m["in_overlap"]
            if m["energy_inside"] is not None:
                self.energy_2d[i] += m["sumsq"]
                self.outside[i] += max(m["sumsq"] - m["energy_inside"], 0.0)
                r, (rows, cols) = raw["svd"]["rank"], raw["shape"]
                self.inside_chance[i] += m["sumsq"] * r * r / (rows * cols)
            if self.fisher:
                self.sens_total[i] += m["sens_total"]
                self.sens_overlap[i] += m["sens_overlap"]
        for j, p in enumerate(raw["pairs"]):
            self.intersection[j] += p["intersection"]
            self.conflicts[j] += p["sign_conflicts"]
            self.dot[j] += p["dot"]
            if n:
                a, b = raw["models"][p["a"]]["updated"], raw["models"][p["b"]]["updated"]
                self.expected_per_tensor[j] += a * b / n

    def metrics(self, labels: Sequence[str]) -> dict[str, Any]:
        base_norm = math.sqrt(self.base_sumsq)
        models = []
        for i in range(self.k):
            d = _ratio(self.updated[i], self.numel)
            entry = {
                "model": i, "label": labels[i], "updated": self.updated[i], "density": d,
                "sparsity": None if d is None else 1.0 - d, "update_norm": math.sqrt(self.sumsq[i]),
                "relative_norm": _ratio(math.sqrt(self.sumsq[i]), base_norm),
                "updated_in_overlap": self.in_overlap[i],
                "overlap_fraction": _ratio(self.in_overlap[i], self.updated[i]),
                "off_principal_share": _ratio(self.outside[i], self.energy_2d[i]),
                "off_principal_chance": (1.0 - self.inside_chance[i] / self.energy_2d[i]) if self.energy_2d[i]
                else None,
                "principal_vs_chance": _ratio(max(self.energy_2d[i] - self.outside[i], 0.0), self.inside_chance[i]),
            }
            if self.fisher:
                entry["fisher_sensitivity"] = self.sens_total[i]
                entry["fisher_sensitivity_overlap"] = self.sens_overlap[i]
                entry["fisher_overlap_share"] = _ratio(self.sens_overlap[i], self.sens_total[i])
            models.append({k: _finite(v) for k, v in entry.items()})
        pairs = []
        n = self.numel
        for j, (a, b) in enumerate(self.pair_ix):
            na, nb, inter = self.updated[a], self.updated[b], self.intersection[j]
            p, q = (na / n, nb / n) if n else (0.0, 0.0)
            union = na + nb - inter
            expected = n * p * q
            jac, jac_chance = _ratio(inter, union), _ratio(p * q, p + q - p * q)
            ovs, ovs_chance = _ratio(inter, min(na, nb)), _ratio(p * q, min(p, q))
            entry = {
                "a": a, "b": b, "labels": [labels[a], labels[b]], "intersection": inter, "union": union,
                "jaccard": jac, "jaccard_chance": jac_chance,
                "jaccard_vs_chance": None if jac is None or not jac_chance else jac / jac_chance,
                "overlap_over_smaller": ovs, "overlap_over_smaller_chance": ovs_chance,
                "expected_intersection": expected, "intersection_vs_chance": _ratio(inter, expected),
                "expected_intersection_per_tensor": self.expected_per_tensor[j],
                "sign_conflicts": self.conflicts[j], "sign_conflict_rate": _ratio(self.conflicts[j], inter),
                "dot": self.dot[j], "cosine": _ratio(self.dot[j], math.sqrt(self.sumsq[a] * self.sumsq[b])),
            }
            pairs.append({k: _finite(v) for k, v in entry.items()})
        return {"num_tensors": self.tensors, "numel": n, "base_norm": _finite(base_norm),
                "svd_tensors": self.svd_tensors, "models": models, "pairs": pairs}


def aggregate(raws: Sequence[dict[str, Any]], labels: Sequence[str], fisher: bool) -> dict[str, Any]:
    """Per-tensor, per-layer, per-module and overall metrics from per-tensor sufficient statistics."""
    k = len(labels)
    overall = _Sums(k, fisher)
    layers: dict[int, _Sums] = {}
    groups: dict[str, _Sums] = {}
    kinds: dict[str, _Sums] = {}
    per_tensor = []
    for raw in raws:
        layer = layer_index(raw["name"])
        group, kind = module_kind(raw["name"])
        overall.add(raw)
        groups.setdefault(group, _Sums(k, fisher)).add(raw)
        kinds.setdefault(kind, _Sums(k, fisher)).add(raw)
        if layer is not None:
            layers.setdefault(layer, _Sums(k, fisher)).add(raw)
        one = _Sums(k, fisher)
        one.add(raw)
        m = one.metrics(labels)
        per_tensor.append({"name": raw["name"], "shape": raw["shape"], "dtype": raw["dtype"], "layer": layer,
                           "module": group, "kind": kind, "svd": raw["svd"], "numel": raw["numel"],
                           "base_norm": m["base_norm"], "models": m["models"], "pairs": m["pairs"]})
    order = [g for g in MODULE_GROUPS if g in groups]
    return {
        "overall": overall.metrics(labels),
        "per_module": {g: groups[g].metrics(labels) for g in order},
        "per_kind": {kd: s.metrics(labels) for kd, s in sorted(kinds.items())},
        "per_layer": [{"layer": i, **layers[i].metrics(labels)} for i in sorted(layers)],
        "per_tensor": per_tensor,
    }


# --------------------------------------------------------------------------- the report


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def _pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


# One formatter per quantity, used by the tables and by the reading alike, so a sentence quotes
# exactly the cell it reads; the words are chosen from the number as printed (see _shown).
def _cell_density(x: float | None) -> str:
    return _pct(x, 3)


def _cell_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}x"


def _cell_cosine(x: float | None) -> str:
    return _fmt(x)


def _cell_share(x: float | None) -> str:  # off-principal share and its chance value
    return _pct(x, 2)


def _cell_conflicts(x: float | None) -> str:
    return _pct(x, 1)


def _shown(cell: str) -> float | None:
    """The value a printed cell shows (``25.600%`` -> 0.256, ``3.76x`` -> 3.76), or None for n/a."""
    if cell == "n/a":
        return None
    if cell.endswith("%"):
        return float(cell[:-1]) / 100
    return float(cell.rstrip("x"))


DENSITY_WORDS = ((0.01, "very sparse"), (0.10, "sparse"), (0.50, "moderately sparse"), (math.inf, "dense"))
"""A density (as printed) below the first bound gets its word; 0 reads "unchanged"."""
OVERLAP_BELOW = 0.5
OVERLAP_ABOVE = 2.0
"""Overlap vs chance (as printed): < 0.5x well below chance, > 2x well above, else within a factor of 2."""
COSINE_ORTHOGONAL = 0.1
COSINE_ALIGNED = 0.5
"""|cosine| (as printed) < 0.1: nearly orthogonal; < 0.5: partly aligned/opposed; else aligned/opposed."""
SPARSE_BELOW = DENSITY_WORDS[1][0]
"""Densities below this read "very sparse" or "sparse" (the low-interference sentence needs every model there)."""


def _density_rule() -> str:
    bands, low = ["unchanged: 0"], None
    for bound, word in DENSITY_WORDS:
        top = "" if math.isinf(bound) else f"< {100 * bound:g}%"
        bands.append(f"{word}: " + (f">= {100 * low:g}%" if not top else f"{100 * low:g}% to {top}" if low else top))
        low = bound
    return "; ".join(bands)


READING_RULES = {
    "numbers": "every number in the reading is a cell of the tables above it (same quantity, same rounding), a "
               "threshold below or the rank fraction of the header; every word is chosen from the number as printed",
    "density": f"{_density_rule()} (the 'density' column)",
    "overlap": f"well below chance: < {OVERLAP_BELOW:g}x; within a factor of {OVERLAP_ABOVE:g} of chance: "
               f"{OVERLAP_BELOW:g}x to {OVERLAP_ABOVE:g}x; well above chance: > {OVERLAP_ABOVE:g}x "
               f"(the 'overlap vs chance' column, |A & B| / (N p q))",
    "cosine": f"nearly orthogonal: |cosine| < {COSINE_ORTHOGONAL:g}; partly aligned / partly opposed: "
              f"{COSINE_ORTHOGONAL:g} <= |cosine| < {COSINE_ALIGNED:g}; aligned / opposed: |cosine| >= "
              f"{COSINE_ALIGNED:g} (the 'cosine' column)",
    "off_principal": f"the update energy inside the base's principal block against randomly placed updates "
                     f"(the 'principal energy vs chance' column): avoids the principal directions: < "
                     f"{OVERLAP_BELOW:g}x; about as random updates: {OVERLAP_BELOW:g}x to {OVERLAP_ABOVE:g}x; "
                     f"concentrates on them: > {OVERLAP_ABOVE:g}x",
    "interference": f"the low-interference sentence appears only when every model is very sparse or sparse "
                    f"(< {100 * SPARSE_BELOW:g}%), no pair is above {OVERLAP_ABOVE:g}x chance and every pair is "
                    f"nearly orthogonal",
}


def density_word(cell: str) -> str | None:
    """The density word of a printed density cell (:data:`DENSITY_WORDS`)."""
    d = _shown(cell)
    if d is None:
        return None
    if d == 0:
        return "unchanged"
    return next(word for bound, word in DENSITY_WORDS if d < bound)


def overlap_word(cell: str) -> str | None:
    """``below``, ``near`` or ``above`` for a printed overlap-vs-chance cell."""
    r = _shown(cell)
    if r is None:
        return None
    return "below" if r < OVERLAP_BELOW else "above" if r > OVERLAP_ABOVE else "near"


def cosine_word(cell: str) -> str | None:
    """The cosine word of a printed cosine cell."""
    c = _shown(cell)
    if c is None:
        return None
    if abs(c) < COSINE_ORTHOGONAL:
        return "nearly orthogonal"
    side = "aligned" if c > 0 else "opposed"
    return side if abs(c) >= COSINE_ALIGNED else f"partly {side}"


def interpret(report: dict[str, Any]) -> list[str]:
    """Plain-language sentences on the overall numbers, quoting the cells of the tables."""
    overall = report["overall"]
    out = []
    words = []
    dens = [(m["label"], _cell_density(m["density"])) for m in overall["models"] if m["density"] is not None]
    if dens:
        words = [density_word(cell) for _, cell in dens]
        out.append("Update density (column 'density'): " + ", ".join(
            f"{label} {cell} ({word})" for (label, cell), word in zip(dens, words, strict=True)) + ".")
    bands: dict[str, list[str]] = {"below": [], "near": [], "above": []}
    cosines: dict[str, list[str]] = {}
    orth = 0
    for p in overall["pairs"]:
        name = f"{p['labels'][0]} / {p['labels'][1]}"
        cell = _cell_ratio(p["intersection_vs_chance"])
        band = overlap_word(cell)
        if band is not None:
            quote = f"{name}: {cell}"
            if band == "above":
                quote += f", sign conflicts in overlap {_cell_conflicts(p['sign_conflict_rate'])}"
            bands[band].append(quote)
        cos = _cell_cosine(p["cosine"])
        word = cosine_word(cos)
        if word is not None:
            cosines.setdefault(word, []).append(f"{name} {cos}")
            orth += word == "nearly orthogonal"
    if bands["below"]:
        out.append(f"Overlap well below chance (column 'overlap vs chance' < {OVERLAP_BELOW:g}x; "
                   + "; ".join(bands["below"]) + "): the models update largely separate entries.")
    if bands["near"]:
        out.append(f"Overlap within a factor of {OVERLAP_ABOVE:g} of chance (column 'overlap vs chance' {OVERLAP_BELOW:g}x to "
                   f"{OVERLAP_ABOVE:g}x; " + "; ".join(bands["near"]) + "): the models share about as many "
                   "entries, within that factor, as independent random masks of these densities would.")
    if bands["above"]:
        out.append(f"Overlap well above chance (column 'overlap vs chance' > {OVERLAP_ABOVE:g}x; "
                   + "; ".join(bands["above"]) + "): the models concentrate on the same entries; the sign-conflict "
                   "rate says how many of those updates pull in opposite directions.")
    for word in ("nearly orthogonal", "partly aligned", "aligned", "partly opposed", "opposed"):
        if word in cosines:
            out.append(f"Task vectors {word} (column 'cosine'): " + ", ".join(cosines[word]) + ".")
    pairs = len(overall["pairs"])
    if (pairs and orth == pairs and not bands["above"] and words
            and all(w in ("very sparse", "sparse", "unchanged") for w in words)):
        out.append(f"Every model's update is sparse (density < {100 * SPARSE_BELOW:g}%), no pair overlaps more than {OVERLAP_ABOVE:g}x "
                   f"chance and every pair is nearly orthogonal: such updates interfere little when merged, so "
                   f"methods that keep each model's sparse update intact (plain task-vector sums, merges that do "
                   f"not trim) lose little to interference.")
    offs = [m for m in overall["models"] if m["off_principal_share"] is not None]
    if offs:
        rf = report["settings"]["rank_fraction"]
        block = f"the base's top {100 * rf:g}% principal block (rank fraction {rf:g})"
        by: dict[str | None, list[str]] = {}
        for m in offs:
            ratio = _cell_ratio(m.get("principal_vs_chance"))
            by.setdefault(overlap_word(ratio), []).append(
                f"{m['label']} {_cell_share(m['off_principal_share'])} outside (chance "
                f"{_cell_share(m.get('off_principal_chance'))}), {ratio} the chance energy inside")
        meaning = {
            "below": (f"well below chance (< {OVERLAP_BELOW:g}x)", "the updates avoid the base's principal directions"),
            "near": (f"within a factor of {OVERLAP_ABOVE:g} of chance ({OVERLAP_BELOW:g}x to {OVERLAP_ABOVE:g}x)",
                     "about as much as updates placed at random"),
            "above": (f"well above chance (> {OVERLAP_ABOVE:g}x)",
                      "the updates concentrate on the base's principal directions"),
            None: ("", "no chance value"),
        }
        for key in ("below", "near", "above", None):
            if key in by:
                band, gloss = meaning[key]
                head = f"Update energy inside {block}" + (f" is {band}" if band else "")
                out.append(f"{head} (columns 'off-principal share', 'chance', 'principal energy vs chance'): "
                           + "; ".join(by[key]) + f": {gloss}.")
    return out


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the headline tables and what they mean."""
    inp, st, overall = report["inputs"], report["settings"], report["overall"]
    fisher = inp["fisher"] is not None
    lines = ["# sar-dist analyze", "",
             f"Base: `{inp['base']}`  ", f"{report['num_tensors']} tensors, {report['num_parameters']:,} entries; "
             f"tolerance {st['tolerance']:g}, rank fraction {st['rank_fraction']:g}, SVD {st['svd']} "
             f"({st['svd_counts'].get('exact', 0)} exact, {st['svd_counts'].get('randomized', 0)} randomized).", "",
             "## Models", "", "| # | model | Fisher statistics |", "|---|---|---|"]
    for i, url in enumerate(inp["models"]):
        stats = f"`{inp['fisher'][i]}`" if fisher else "-"
        lines.append(f"| {i + 1} ({inp['labels'][i]}) | `{url}` | {stats} |")
    lines += ["", "## Per model (all tensors)", ""]
    head = ("| model | density | updated | sparsity | relative norm ‖t‖/‖base‖ | off-principal share | chance | "
            "principal energy vs chance |")
    sep = "|---|---|---|---|---|---|---|---|"
    if fisher:
        head += " Fisher share in overlap |"
        sep += "---|"
    lines += [head, sep]
    for m in overall["models"]:
        row = (f"| {m['label']} | {_cell_density(m['density'])} | {m['updated']:,} | "
               f"{_cell_density(m['sparsity'])} | {_fmt(m['relative_norm'])} | "
               f"{_cell_share(m['off_principal_share'])} | {_cell_share(m.get('off_principal_chance'))} | "
               f"{_cell_ratio(m.get('principal_vs_chance'))} |")
        if fisher:
            row += f" {_pct(m['fisher_overlap_share'], 2)} |"
        lines.append(row)
    if overall["pairs"]:
        lines += ["", "## Pairs (all tensors)", "",
                  "| pair | Jaccard | chance | overlap / smaller | chance | overlap vs chance | "
                  "sign conflicts in overlap | cosine |", "|---|---|---|---|---|---|---|---|"]
        for p in overall["pairs"]:
            lines.append(
                f"| {p['labels'][0]} / {p['labels'][1]} | {_fmt(p['jaccard'])} | {_fmt(p['jaccard_chance'])} | "
                f"{_fmt(p['overlap_over_smaller'])} | {_fmt(p['overlap_over_smaller_chance'])} | "
                f"{_cell_ratio(p['intersection_vs_chance'])} | {_cell_conflicts(p['sign_conflict_rate'])} "
                f"({p['sign_conflicts']:,} of {p['intersection']:,}) | {_cell_cosine(p['cosine'])} |")
    lines += ["", "## Reading", ""] + [f"- {s}" for s in interpret(report)]
    lines += ["", "How the reading is worded:", ""] + [f"- **{k}**: {v}" for k, v in READING_RULES.items()]
    lines += ["", "## Per module", "",
              "| module | model | density | relative norm | off-principal share | chance | "
              "principal energy vs chance |", "|---|---|---|---|---|---|---|"]
    for group, g in report["per_module"].items():
        for m in g["models"]:
            lines.append(f"| {group} | {m['label']} | {_cell_density(m['density'])} | {_fmt(m['relative_norm'])} | "
                         f"{_cell_share(m['off_principal_share'])} | "
                         f"{_cell_share(m.get('off_principal_chance'))} | "
                         f"{_cell_ratio(m.get('principal_vs_chance'))} |")
    lines += ["", "Per-layer and per-tensor numbers are in `report.json`; figures: "
              + ", ".join(f"`{f}`" for f in FIGURES) + ".", "", "## Definitions", ""]
    lines += [f"- **{k}**: {v}" for k, v in report["definitions"].items()]
    return "\n".join(lines) + "\n"


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What ``--json`` prints: inputs, settings and the overall numbers."""
    return {"output": report["output"], "files": report["files"], "inputs": report["inputs"],
            "settings": report["settings"], "num_tensors": report["num_tensors"],
            "num_parameters": report["num_parameters"], "overall": report["overall"]}


def execute_analyze(plan: AnalyzePlan, *, executor: str = "ray", ray_address: str | None = None,
                    num_cpus: int | None = None) -> dict[str, Any]:
    """Run the tasks, aggregate, and write the report (``report.json`` last). Returns the report."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r} (known: {', '.join(EXECUTORS)})")
    started = time.time()
    total = len(plan.names)
    done = 0

    def on_group(n: int) -> None:
        nonlocal done
        done += n
        logger.info("analyzed %d/%d tensors", done, total)

    logger.info("analyzing %d tensors of %d model(s) in %d task(s) with the %s executor", total, len(plan.models),
                len(plan.groups), executor)
    if executor == "local":
        results = _run_local(plan, on_group)
    else:
        results = _run_ray(plan, on_group, ray_address, num_cpus)
    raws = [r for group in results for r in group]
    assert [r["name"] for r in raws] == plan.names
    fisher = plan.fisher is not None
    agg = aggregate(raws, plan.labels, fisher)
    svd_counts: dict[str, int] = {}
    for r in raws:
        if r["svd"] is not None:
            svd_counts[r["svd"]["method"]] = svd_counts.get(r["svd"]["method"], 0) + 1
    report: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": REPORT_KIND,
        "output": display_url(plan.output),
        "files": [REPORT_JSON, REPORT_MD, *FIGURES],
        "inputs": {"base": display_url(plan.base), "models": [display_url(u) for u in plan.models],
                   "labels": plan.labels,
                   "fisher": [display_url(u) for u in plan.fisher] if plan.fisher else None,
                   "fisher_num_examples": plan.fisher_examples},
        "settings": {"tolerance": plan.settings.tolerance, "rank_fraction": plan.settings.rank_fraction,
                     "svd": plan.settings.svd, "svd_exact_max_dim": EXACT_SVD_MAX_DIM, "svd_niter": SVD_NITER,
                     "svd_oversample": SVD_OVERSAMPLE, "svd_seed": SVD_SEED, "svd_counts": svd_counts,
                     "executor": executor, "tasks": len(plan.groups)},
        "definitions": DEFINITIONS,
        "reading_rules": READING_RULES,
        "num_tensors": total,
        "num_parameters": agg["overall"]["numel"],
        **agg,
    }
    json.dumps(report, allow_nan=False)  # a non-JSON number fails here, before anything is written
    from sar_dist.analyze.figures import render_figures

    figures = render_figures(report)
    storage = Storage(plan.storage_options)
    storage.makedirs(plan.output)
    storage.remove(join(plan.output, REPORT_JSON))  # an earlier report: not complete while we rewrite
    write_claims(storage, plan.output, REPORT_FILES)  # a rerun after a crash here knows these are ours
    storage.write_bytes(join(plan.output, REPORT_MD), render_markdown(report).encode())
    for name in FIGURES:
        storage.write_bytes(join(plan.output, name), figures[name])
    report["elapsed_s"] = round(time.time() - started, 3)
    text = json.dumps(report, indent=1, allow_nan=False).encode()
    storage.write_bytes(join(plan.output, REPORT_JSON), text)  # last: its presence means complete
    remove_state(storage, plan.output, [])
    storage.remove_empty_dir(join(plan.output, STATE_DIR))
    logger.info("done: %s (%d tensors, %.1fs)", display_url(plan.output), total, report["elapsed_s"])
    return report


def run_analyze(
    base: str,
    models: list[str],
    output: str,
    *,
    fisher: list[str] | None = None,
    storage_options: dict | None = None,
    tolerance: float = 0.0,
    rank_fraction: float = 0.01,
    svd: str = "auto",
    force: bool = False,
    executor: str = "ray",
    ray_address: str | None = None,
    num_cpus: int | None = None,
) -> dict:
    """Analyze the task vectors ``model_k - base`` and write the report to ``output``.

    Args:
        base: the base checkpoint directory.
        models: fine-tuned checkpoint directories (at least one).
        output: report directory (local path or fsspec URL).
        fisher: Fisher statistics directories, one per model in the same order (optional).
        storage_options: fsspec options (no credentials).
        tolerance: an entry is updated when |t| > tolerance.
        rank_fraction: share of min(m, n) singular directions that form the principal subspace.
        svd: ``auto``, ``exact`` or ``randomized``.
        executor: ``ray`` or ``local``.
        ray_address: Ray cluster address (None: RAY_ADDRESS, else a local Ray).
        num_cpus: CPUs of a local Ray.

    Returns:
        The report (what ``report.json`` holds).

    Raises:
        ValueError: bad input, before any tensor data is read and before anything is written.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r} (known: {', '.join(EXECUTORS)})")
    plan = prepare_analyze(base, models, output, fisher=fisher, storage_options=storage_options,
                           tolerance=tolerance, rank_fraction=rank_fraction, svd=svd, force=force)
    return execute_analyze(plan, executor=executor, ray_address=ray_address, num_cpus=num_cpus)
