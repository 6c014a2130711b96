"""Per-tensor statistics of task vectors ``t_k = model_k - base``: sufficient statistics only.

One call of :func:`tensor_stats` reads one tensor from the base, every model and (optionally)
every model's Fisher statistics, in row blocks, and returns plain numbers (counts, sums of
squares, dot products, projected energies) that add up exactly across tensors, so per-layer,
per-module and overall figures are formed afterwards from sums, never from averaged ratios.

Conventions (also written into the report as ``definitions``):

* every value is converted to float32 before subtracting; sums are accumulated in float64;
  reductions and the SVD run on one thread, so results do not depend on the executor's thread
  count (elementwise work stays parallel);
* an entry is *updated* by model k when ``|t_k| > tolerance`` (tolerance 0: the float32 values
  differ, i.e. the stored entry changed; ``-0.0`` vs ``0.0`` counts as unchanged);
* the *off-principal share* of a 2-D tensor's update T, with the base W = U S V^T and
  r = max(1, round(rank_fraction * min(m, n))), is ``1 - ||U_r^T T V_r||_F^2 / ||T||_F^2``:
  the share of the update's energy outside the rank-r principal block of the base.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sar_dist.checkpoint.format import FLOAT_DTYPES
from sar_dist.checkpoint.index import TensorRef
from sar_dist.checkpoint.reader import read_tensor
from sar_dist.merge.ops import one_thread
from sar_dist.storage import Storage

EXACT_SVD_MAX_DIM = 1024
"""``--svd auto`` uses an exact SVD up to this min(m, n), torch.svd_lowrank above it."""
SVD_SEED = 0
SVD_NITER = 4
SVD_OVERSAMPLE = 10
BLOCK_NUMEL = 2**24
"""Elements of one tensor read at a time (row blocks): ~64 MiB per input in float32."""

MODULE_GROUPS = ("embed_tokens", "lm_head", "attention", "mlp", "router", "experts", "norm", "other")
"""The module groups of the report, in report order (see :func:`module_kind`)."""
_EMBED = {"embed_tokens", "wte", "embed_in", "word_embeddings"}
_LM_HEAD = {"lm_head", "embed_out"}
_ATTENTION_PROJ = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "dense"}
_ATTENTION = {"self_attn", "attn", "attention", "cross_attn"}
_MLP_PROJ = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "w1", "w2", "w3", "fc1", "fc2", "c_fc", "c_proj",
             "dense_h_to_4h", "dense_4h_to_h"}
_MLP = {"mlp", "feed_forward", "ffn", "block_sparse_moe", "moe"}
_ROUTER = {"router", "gate", "shared_expert_gate"}
_EXPERTS = {"experts", "shared_experts", "shared_expert"}


def module_kind(name: str) -> tuple[str, str]:
    """``(group, kind)`` of a tensor name, from its dot-separated components.

    Groups, tested in this order:

    * ``embed_tokens``: the input embedding (``embed_tokens``, ``wte``, ``embed_in``, ``word_embeddings``);
    * ``lm_head``: the output projection (``lm_head``, ``embed_out``), a group of its own even
      when it is tied to the embedding, because the two take different gradients;
    * ``norm``: any component containing ``norm`` (``input_layernorm``, ``q_norm``, ...);
    * ``router``: an MoE router or gate, a component named exactly ``router``, ``gate`` or
      ``shared_expert_gate`` (``mlp.gate``, ``block_sparse_moe.gate``); not ``gate_proj``;
    * ``experts``: anything under ``experts``, ``shared_experts`` or ``shared_expert``, per-expert
      or fused (``mlp.experts.gate_up_proj``);
    * ``attention``: a q/k/v/o projection or anything under ``self_attn``/``attn``/``attention``;
    * ``mlp``: a gate/up/down projection or anything under ``mlp``/``feed_forward``;
    * ``other``: the rest.

    kind is the projection name where there is one (``q_proj``, ``down_proj``; for experts
    ``experts.down_proj`` or ``shared_experts.down_proj``, so dense and expert projections stay
    apart), else the group.
    """
    parts = name.split(".")
    if any(p in _EMBED for p in parts):
        return "embed_tokens", "embed_tokens"
    if any(p in _LM_HEAD for p in parts):
        return "lm_head", "lm_head"
    if any("norm" in p for p in parts):
        return "norm", "norm"
    if any(p in _ROUTER for p in parts):
        return "router", "router"
    for i, p in enumerate(parts):
        if p in _EXPERTS:
            prefix = "experts" if p == "experts" else "shared_experts"
            proj = next((q for q in parts[i + 1:] if q in _MLP_PROJ), None)
            return "experts", f"{prefix}.{proj}" if proj else prefix
    proj = next((p for p in parts if p in _ATTENTION_PROJ), None)
    if any(p in _ATTENTION for p in parts) or proj in {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"}:
        return "attention", proj or "attention"
    proj = next((p for p in parts if p in _MLP_PROJ), None)
    if proj or any(p in _MLP for p in parts):
        return "mlp", proj or "mlp"
    return "other", "other"


def svd_rank(shape: Sequence[int], rank_fraction: float) -> int:
    """r = max(1, round(rank_fraction * min(m, n)))."""
    return max(1, round(rank_fraction * min(shape)))


def svd_method(shape: Sequence[int], mode: str) -> str:
    """``exact`` or ``randomized`` for a 2-D shape under ``--svd auto|exact|randomized``."""
    if mode == "auto":
        return "exact" if min(shape) <= EXACT_SVD_MAX_DIM else "randomized"
    return mode


def principal_bases(w: torch.Tensor, r: int, method: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The top-r left and right singular vectors of ``w`` (float32), as ``(U_r, V_r, q)``.

    ``exact``: ``torch.linalg.svd``. ``randomized``: ``torch.svd_lowrank`` with q = r + 10 columns
    (at most min(m, n)), ``niter=4`` and the global RNG seeded with ``SVD_SEED`` in a forked RNG
    state (the same draw for every tensor, whatever ran before it). ``q`` is returned for the
    report (min(m, n) for the exact SVD).
    """
    if method == "exact":
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r].contiguous(), vh[:r].T.contiguous(), min(w.shape)
    q = min(min(w.shape), r + SVD_OVERSAMPLE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SVD_SEED)
        u, _, v = torch.svd_lowrank(w, q=q, niter=SVD_NITER)
    return u[:, :r].contiguous(), v[:, :r].contiguous(), q


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorJob:
    """What one tensor's statistics need: where its data lives in every input."""

    name: str
    base: TensorRef
    models: tuple[TensorRef, ...]
    fisher: tuple[TensorRef, ...] | None = None
    fisher_examples: tuple[int, ...] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    tolerance: float = 0.0
    rank_fraction: float = 0.01
    svd: str = "auto"


def _row_blocks(shape: Sequence[int]) -> list[tuple[int, int] | None]:
    if not shape or shape[0] == 0:
        return [None]
    row = max(1, math.prod(shape[1:]))
    step = max(1, BLOCK_NUMEL // row)
    return [(r0, min(shape[0], r0 + step)) for r0 in range(0, shape[0], step)]


def _f32(storage: Storage, ref: TensorRef, rows: tuple[int, int] | None) -> torch.Tensor:
    return read_tensor(storage, ref, rows).to(torch.float32)


def _sum64(x: torch.Tensor) -> float:
    return float(x.sum(dtype=torch.float64))


def tensor_stats(storage: Storage, job: TensorJob, settings: Settings) -> dict[str, Any]:
    """Sufficient statistics of one tensor for every model and pair of models.

    Returns:
        Plain data: ``name, shape, numel, base_sumsq, svd`` (``{"method", "rank", "q"}`` for
        float 2-D tensors, else None), ``models`` (per model: ``updated``, ``sumsq``,
        ``in_overlap`` = updated entries that at least one other model also updates,
        ``energy_inside`` = ||U_r^T T V_r||_F^2 or None, ``sens_total`` = sum F t^2 and
        ``sens_overlap`` = the same over entries updated by >= 2 models, or None without
        Fisher), ``pairs`` (for a < b in order: ``intersection``, ``sign_conflicts``, ``dot``).
    """
    shape = tuple(job.base.info.shape)
    k = len(job.models)
    pair_ix = [(a, b) for a in range(k) for b in range(a + 1, k)]
    tol = settings.tolerance

    svd: dict[str, Any] | None = None
    u_r = v_r = None
    base_full = None
    if len(shape) == 2 and min(shape) > 0 and job.base.info.dtype in FLOAT_DTYPES:
        method = svd_method(shape, settings.svd)
        r = svd_rank(shape, settings.rank_fraction)
        base_full = _f32(storage, job.base, None)
        with one_thread():  # LAPACK/BLAS results vary in the last bits with the thread count
            u_r, v_r, q = principal_bases(base_full, r, method)
        svd = {"method": method, "rank": r, "q": q}
    # U_r^T T_k accumulated over row blocks (r x n, float64)
    left = [torch.zeros((u_r.shape[1], shape[1]), dtype=torch.float64) for _ in range(k)] if u_r is not None else []

    base_sumsq = 0.0
    updated = [0] * k
    sumsq = [0.0] * k
    in_overlap = [0] * k
    sens_total = [0.0] * k
    sens_overlap = [0.0] * k
    inter = [0] * len(pair_ix)
    conflicts = [0] * len(pair_ix)
    dots = [0.0] * len(pair_ix)

    for rows in _row_blocks(shape):
        if base_full is not None:
            b = base_full if rows is None else base_full[rows[0]:rows[1]]
        else:
            b = _f32(storage, job.base, rows)
        ts = [_f32(storage, ref, rows) - b for ref in job.models]
        masks = [t.abs() > tol for t in ts]
        positive = [t > 0 for t in ts]
        count = torch.zeros(b.shape, dtype=torch.int32)
        for m in masks:
            count += m
        overlap = count >= 2
        with one_thread():  # reductions: the same bits for any thread count (executors differ)
            base_sumsq += _sum64(b * b)
            for i, (t, m) in enumerate(zip(ts, masks, strict=True)):
                updated[i] += int(m.sum())
                sumsq[i] += _sum64(t * t)
                in_overlap[i] += int((m & overlap).sum())
                if u_r is not None:
                    left[i] += (u_r[rows[0]:rows[1]].T @ t).double()
            for j, (a, c) in enumerate(pair_ix):
                both = masks[a] & masks[c]
                inter[j] += int(both.sum())
                conflicts[j] += int((both & (positive[a] != positive[c])).sum())
                dots[j] += _sum64(ts[a] * ts[c])
            if job.fisher is not None:
                assert job.fisher_examples is not None
                for i, (ref, n) in enumerate(zip(job.fisher, job.fisher_examples, strict=True)):
                    sens = _f32(storage, ref, rows) / n * ts[i] * ts[i]
                    sens_total[i] += _sum64(sens)
                    sens_overlap[i] += _sum64(sens * overlap)

    inside: list[float | None] = [None] * k
    if v_r is not None:
        with one_thread():
            for i in range(k):
                inside[i] = float((left[i] @ v_r.double()).square().sum())

    models = []
    for i in range(k):
        models.append({
            "updated": updated[i], "sumsq": sumsq[i], "in_overlap": in_overlap[i], "energy_inside": inside[i],
            "sens_total": sens_total[i] if job.fisher is not None else None,
            "sens_overlap": sens_overlap[i] if job.fisher is not None else None,
        })
    pairs = [{"a": a, "b": c, "intersection": inter[j], "sign_conflicts": conflicts[j], "dot": dots[j]}
             for j, (a, c) in enumerate(pair_ix)]
    return {"name": job.name, "shape": list(shape), "dtype": job.base.info.dtype, "numel": math.prod(shape),
            "base_sumsq": base_sumsq, "svd": svd, "models": models, "pairs": pairs}


def estimate_bytes(job: TensorJob) -> int:
    """Rough peak bytes of :func:`tensor_stats` on ``job``: the float32 base of a 2-D tensor twice
    (it and the SVD's work), plus about four float32-sized arrays per input per row block."""
    shape = job.base.info.shape
    full = job.base.info.numel * 4 * 2 if len(shape) == 2 else 0
    block = min(job.base.info.numel, max(BLOCK_NUMEL, math.prod(shape[1:]) if shape else 1)) * 4
    inputs = 1 + len(job.models) + (len(job.fisher) if job.fisher else 0)
    return full + 4 * inputs * block


def run_group(storage: Storage, jobs: Sequence[TensorJob], settings: Settings) -> list[dict[str, Any]]:
    """Statistics of a group of tensors (one executor task)."""
    return [tensor_stats(storage, job, settings) for job in jobs]
