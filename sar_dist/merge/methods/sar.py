"""SAR-Merging (arXiv 2606.18521) and Fisher-weighted averaging (Matena and Raffel).

SAR, as docs/methods.md (`sar`) reads the paper; every choice is a parameter:

1. ``t_k = w_k * (x_k - base)``; update mask ``m_k = |t_k| > eps``; ``F_k`` the model's mean
   Fisher (sum / num_examples), divided by its global L2 norm with ``fisher_norm: l2`` (the
   executor hands the method ``F_k`` already scaled: ``TensorJob.fisher_scale``), floored at
   ``fisher_floor`` so all-zero statistics still give a defined mean.
2. an entry updated by exactly one model keeps that update whole;
3. an entry updated by several: ``sensitivity`` (default) takes the Fisher-weighted mean
   ``sum F_k t_k / sum F_k`` over the updaters when their signs agree, else the update of the
   updater with the largest ``s_k = F_k t_k**2`` (ties: first model); ``fisher_mean`` takes the
   Fisher-weighted mean of all updaters; ``fisher_elect`` elects the sign of ``sum F_k t_k`` and
   takes the Fisher-weighted mean of the updaters with that sign;
4. of the ``n`` nonzero entries of the merged update keep the ``round(density * n)`` largest in
   magnitude (ties: lowest flattened index), rescaled so the tensor's update keeps its L1
   (``rescale: l1``) or L2 norm (``none``: no rescale);
5. ``base + lambda * update``.

Steps 1-3 are elementwise; step 4 needs whole-tensor statistics, gathered in passes over row
blocks by :class:`SarState` (count, exact threshold, norms), so a tensor merged in chunks is
bit-identical to the whole-tensor merge.

``fisher`` (Matena and Raffel, arXiv 2111.09832): ``sum_k w_k F_k x_k / sum_k w_k F_k``,
elementwise, ``F_k`` floored at ``fisher_floor``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sar_dist.merge import ops
from sar_dist.merge.base import (
    ANY_REAL,
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    Constraint,
    TensorContext,
    method_param,
    per_model,
)
from sar_dist.merge.methods.trim import MAX_KEPT_MAGNITUDES

SAR_URL = "https://arxiv.org/abs/2606.18521"
FISHER_URL = "https://arxiv.org/abs/2111.09832"
ARBITRATIONS = ("sensitivity", "fisher_mean", "fisher_elect")
RESCALES = ("l1", "l2", "none")
FISHER_NORMS = ("l2", "none")
DEFAULT_FISHER_FLOOR = 1e-30


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ValueError(f"parameter '{key}': {value!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class SarParams:
    """Parameters of ``sar`` (docs/methods.md, `sar`; defaults there).

    Attributes:
        weights: per-model ``weight`` w_k scaling each task vector (default 1).
        eps: ``eps``, an entry is an update where ``|t_k| > eps`` (default 0: bitwise changed).
        fisher_norm: ``fisher_norm``, ``l2`` (divide each model's mean Fisher by its global L2
            norm, from fisher.json) or ``none``.
        fisher_floor: ``fisher_floor``, lower bound of F_k (default 1e-30).
        arbitration: ``arbitration``, ``sensitivity`` | ``fisher_mean`` | ``fisher_elect``.
        density: ``density``, fraction of the merged update's nonzero entries kept (default 1).
        rescale: ``rescale``, ``l1`` | ``l2`` | ``none`` after the sparsification.
        lam: ``lambda``, scale of the merged update (default 1).
    """

    weights: tuple[float, ...] = per_model(
        "weight", 1.0, valid=ANY_REAL,
        why="t_k = w_k (x_k - base): a negative weight negates a task vector, 0 leaves the model out",
    )
    eps: float = method_param(
        "eps", 0.0, valid=NON_NEGATIVE, why="a threshold on |t_k|; 0 counts every bitwise change"
    )
    fisher_norm: str = method_param("fisher_norm", "l2")
    fisher_floor: float = method_param(
        "fisher_floor", DEFAULT_FISHER_FLOOR, valid=NON_NEGATIVE,
        why="a lower bound of the Fisher values F_k, which are >= 0; SAR's means guard a zero Fisher sum",
    )
    arbitration: str = method_param("arbitration", "sensitivity")
    density: float = method_param(
        "density", 1.0, valid=UNIT, why="the fraction of the merged update's nonzero entries kept: 0 none, 1 all"
    )
    rescale: str = method_param("rescale", "l1")
    lam: float = method_param(
        "lambda", 1.0, valid=ANY_REAL, why="the scale of the merged update: 0 gives the base, < 0 subtracts it"
    )

    def __post_init__(self) -> None:
        _check_choice(self.fisher_norm, FISHER_NORMS, "fisher_norm")
        _check_choice(self.arbitration, ARBITRATIONS, "arbitration")
        _check_choice(self.rescale, RESCALES, "rescale")


@dataclass(frozen=True, kw_only=True, slots=True)
class FisherParams:
    """Parameters of ``fisher`` (Fisher-weighted averaging).

    Attributes:
        weights: per-model ``weight`` (default 1).
        fisher_norm: ``fisher_norm``, ``l2`` (default) or ``none``, as for ``sar``.
        fisher_floor: ``fisher_floor``, lower bound of F_k (default 1e-30).
    """

    weights: tuple[float, ...] = per_model(
        "weight", 1.0, valid=NON_NEGATIVE,
        why="the mixing coefficients of a Fisher-weighted average (Matena and Raffel): a negative one can "
            "cancel the divisor sum_k w_k F_k",
    )
    fisher_norm: str = method_param("fisher_norm", "l2")
    fisher_floor: float = method_param(
        "fisher_floor", DEFAULT_FISHER_FLOOR, valid=POSITIVE,
        why="a lower bound of F_k: with 0, an entry whose Fisher is 0 in every model (an embedding row of "
            "a token the data never shows) is 0/0 = NaN",
    )

    CONSTRAINTS: ClassVar[tuple[Constraint, ...]] = (
        Constraint(
            keys=("weight",), per_model=False,
            text="the weights must sum to more than 0",
            why="the average divides by sum_k w_k F_k, 0 where every weight is 0",
            applies=lambda v: True,
            margins=lambda v: (sum(v["weight"]),),
        ),
    )

    def __post_init__(self) -> None:
        _check_choice(self.fisher_norm, FISHER_NORMS, "fisher_norm")


def fisher(tensors: Sequence[Tensor], base: Tensor | None, p: FisherParams, *, ctx: TensorContext,
           fisher: Sequence[Tensor]) -> Tensor:
    """Fisher merging (Matena and Raffel, arXiv 2111.09832, https://arxiv.org/abs/2111.09832).

    ``sum_k w_k F_k x_k / sum_k w_k F_k`` elementwise, ``F_k`` floored at ``fisher_floor``.

    Args:
        tensors: the models' tensors (compute dtype).
        base: unused (the average is over the models themselves).
        p: weights, floor.
        ctx: the tensor (unused: deterministic).
        fisher: each model's F (mean statistics, normalised as ``fisher_norm`` says).

    Returns:
        The merged tensor.
    """
    num = torch.zeros_like(tensors[0])
    den = torch.zeros_like(tensors[0])
    for x, f, w in zip(tensors, fisher, p.weights, strict=True):
        wf = f.clamp_min(p.fisher_floor).mul_(w)
        num.addcmul_(wf, x)
        den.add_(wf)
    return num.div_(den)


def sar_update(tensors: Sequence[Tensor], base: Tensor, p: SarParams, fisher: Sequence[Tensor]) -> Tensor:
    """Steps 1-3: the arbitrated update of a block (elementwise, before sparsification).

    RLVR updates are sparse: an entry where every model equals the base is +0 under every
    arbitration, and one updated by a single model is that model's update. Only the entries
    some model changed are gathered, and the Fisher arithmetic runs only on those updated by
    several; the result is bit-identical to the dense formulas (tests/test_sar.py).
    """
    if (len(tensors) > ops.ORDERED_SUM_MAX_MODELS or base.device.type != "cpu"  # the order was measured on CPU only
            or not all(math.isfinite(w) for w in p.weights)):
        return _dense_update(tensors, base, p, fisher)
    shape = base.shape
    flat = [x.reshape(-1) for x in tensors]
    idx = ops.changed_entries(flat, base)  # elsewhere x - base is +-0, never an update
    base = base.reshape(-1)
    out = torch.zeros_like(base)
    if idx.numel() == 0:
        return out.view(shape)
    # gathers and scatters by index lists (index_select / index_copy_), several times faster on the
    # CPU than indexing by bool masks or index tensors; the same values
    b = base.index_select(0, idx)
    t = torch.stack([x.index_select(0, idx).sub_(b).mul_(w) for x, w in zip(flat, p.weights, strict=True)])
    m = t.abs() > p.eps
    t.mul_(m)
    count = m.sum(dim=0)
    sub = torch.zeros_like(b)  # count 0: +0 under every arbitration
    single = ops.flat_indices(count == 1)
    sub.index_copy_(0, single, ops.ordered_sum(t.index_select(1, single)))  # one update plus signed zeros
    several = ops.flat_indices(count >= 2)
    if several.numel():
        at = idx.index_select(0, several)
        fk = torch.stack([f.reshape(-1).index_select(0, at) for f in fisher])
        sub.index_copy_(0, several, _arbitrate(t.index_select(1, several), m.index_select(1, several), fk,
                                               count.index_select(0, several), p))
    out.index_copy_(0, idx, sub)
    return out.view(shape)


def _dense_update(tensors: Sequence[Tensor], base: Tensor, p: SarParams, fisher: Sequence[Tensor]) -> Tensor:
    """Steps 1-3 on every entry, as K x N stacks (any number of models)."""
    t = torch.stack([(x - base).mul_(w) for x, w in zip(tensors, p.weights, strict=True)])
    m = t.abs() > p.eps
    t.mul_(m)
    count = m.sum(dim=0)
    update = _arbitrate(t, m, torch.stack(list(fisher)), count, p, lambda a: a.sum(dim=0))
    # exclusive entries: exactly the one update (the mean of one equals it only up to rounding)
    return torch.where(count == 1, t.sum(dim=0), update)


def _arbitrate(t: Tensor, m: Tensor, fisher: Tensor, count: Tensor, p: SarParams, total=ops.ordered_sum) -> Tensor:
    """Step 3 over columns of masked updates ``t`` (K, n), masks ``m``, raw F ``fisher`` (K, n)."""
    f = fisher.clamp_min(p.fisher_floor) * m  # F_k over updaters only
    ft = f * t
    sum_ft = total(ft)
    sum_f = total(f)
    mean = torch.where(count > 0, sum_ft / torch.where(sum_f > 0, sum_f, torch.ones_like(sum_f)), torch.zeros_like(sum_f))
    if p.arbitration == "fisher_mean":
        return mean
    if p.arbitration == "fisher_elect":
        elected = torch.sign(sum_ft)
        agree = m & (torch.sign(t) == elected)
        fa = f * agree
        den = total(fa)
        return torch.where(den > 0, total(fa * t) / torch.where(den > 0, den, torch.ones_like(den)),
                           torch.zeros_like(den))
    # sensitivity
    positive = ((t > 0) & m).sum(dim=0)
    negative = ((t < 0) & m).sum(dim=0)
    conflict = (positive > 0) & (negative > 0)
    s = torch.where(m, f * t * t, torch.full_like(t, -1.0))  # non-updaters never win
    winner = s.argmax(dim=0, keepdim=True)  # first maximum: lowest model index on ties
    strongest = t.gather(0, winner).squeeze(0)
    return torch.where(conflict, strongest, mean)


def _row_sums(x: Tensor, kind: str, out: Tensor) -> Tensor:
    """Per-row float64 sums of ``|x|`` (l1) or ``x**2`` (l2) into ``out``: chunking- and thread-independent."""
    if kind == "l1":
        return ops.row_l1(x, out=out)
    rows = x.reshape(x.shape[0], -1) if x.dim() else x.reshape(1, 1)
    return torch.sum(rows.double().square(), dim=1, out=out)


class SarState:
    """Step 4's whole-tensor statistics of the merged update, gathered in passes.

    Passes over all row blocks in order: count the nonzero entries of the update (keeping their
    magnitudes while few), fix the exact ``round(density * n)``-th largest magnitude (one
    ``kthvalue`` or radix passes), then the norms for the rescale. ``sparsify`` then applies it
    block by block.

    Args:
        params: the tensor's ``SarParams``.
        numel: elements in the whole tensor.
        dtype: compute dtype.
        device: compute device.
    """

    def __init__(self, params: SarParams, numel: int, dtype: torch.dtype, device: torch.device | str):
        self.params, self.numel, self._dtype, self._device = params, numel, dtype, device
        self._phase = "count" if params.density < 1 else "ready"
        self._nonzero = 0
        self._values: list[Tensor] | None = []
        self._num_values = 0
        self._selector: ops.MagnitudeSelector | None = None
        self._norms = (ops.RowSums(numel), ops.RowSums(numel))
        self._factor: Tensor | None = None
        self._empty = False

    def needs_pass(self) -> bool:
        return self._phase != "ready"

    def observe(self, tensors: Sequence[Tensor], base: Tensor, ctx: TensorContext | None = None, *,
                fisher: Sequence[Tensor]) -> None:
        """Feed one row block (compute dtype; ``fisher`` already scaled) during a pass."""
        self.observe_update(sar_update(tensors, base, self.params, fisher))

    def observe_update(self, u: Tensor) -> None:
        if self._phase == "count":
            nz = ops.nonzero_values(u.reshape(-1))
            self._nonzero += nz.numel()
            if self._values is not None and self._num_values + nz.numel() <= MAX_KEPT_MAGNITUDES:
                self._values.append(nz.abs())
                self._num_values += nz.numel()
            else:
                self._values = None
        elif self._phase == "select":
            self._selector.observe(u)
        elif self._phase == "norms":
            before, after = self._norms
            _row_sums(u, self.params.rescale, before.slot(u))
            _row_sums(u * self._selector.mask(u), self.params.rescale, after.slot(u))

    def end_pass(self) -> None:
        if self._phase == "count":
            keep = round(self.params.density * self._nonzero)
            self._values, values = None, self._values
            if keep >= self._nonzero:  # everything nonzero is kept: step 4 is the identity
                self._phase = "ready"
                return
            if keep <= 0:
                self._empty = True
                self._phase = "ready"
                return
            self._selector = ops.MagnitudeSelector(self.numel, keep, self._dtype, self._device)
            if values is not None:
                self._selector.resolve_from_values(torch.cat(values))
            self._phase = "select"
        elif self._phase == "select":
            self._selector.end_pass()
        elif self._phase == "norms":
            before, after = self._norms
            self._factor = self._rescale_factor(before.pieces(), after.pieces())
            self._selector.rewind()
            self._norms = (ops.RowSums(self.numel), ops.RowSums(self.numel))
            self._phase = "ready"
            return
        if self._phase == "select" and not self._selector.needs_pass():
            self._phase = "norms" if self.params.rescale != "none" else "ready"

    def _rescale_factor(self, before: list[Tensor], after: list[Tensor]) -> Tensor | None:
        if self.params.rescale == "l1":
            return ops.rescale_factor(before, after, self._dtype)
        with ops.one_thread():
            b = torch.cat(before).sum().sqrt().to(self._dtype)
            a = torch.cat(after).sum().sqrt().to(self._dtype)
        return b / a if b > 0 and a > 0 else None

    def run(self, u: Tensor) -> SarState:
        """All passes over a whole update given as one block."""
        while self.needs_pass():
            self.observe_update(u)
            self.end_pass()
        return self

    def sparsify(self, u: Tensor) -> Tensor:
        """Step 4 on the next row block of the update (blocks in order, after the passes)."""
        assert not self.needs_pass()
        if self._empty:
            return torch.zeros_like(u)
        if self._selector is None:
            return u
        kept = u * self._selector.mask(u)
        return kept.mul_(self._factor.to(kept.device)) if self._factor is not None else kept


def sar(tensors: Sequence[Tensor], base: Tensor, p: SarParams, *, ctx: TensorContext, fisher: Sequence[Tensor],
        state: SarState | None = None) -> Tensor:
    """SAR-Merging (arXiv 2606.18521, https://arxiv.org/abs/2606.18521), steps 1-5 of the module doc.

    Args:
        tensors: the fine-tuned models' tensors (compute dtype).
        base: the base model's tensor.
        p: the resolved parameters.
        ctx: the tensor (unused: deterministic).
        fisher: each model's F (mean statistics, normalised as ``fisher_norm`` says).
        state: for a row block, the whole tensor's step-4 statistics (:class:`SarState`).

    Returns:
        ``base + lambda * update``, the block's or the whole tensor's.
    """
    u = sar_update(tensors, base, p, fisher)
    if state is None:
        state = SarState(p, u.numel(), u.dtype, u.device).run(u)
    return sar_finish(u, base, p, state)


def sar_finish(u: Tensor, base: Tensor, p: SarParams, state: SarState) -> Tensor:
    """Steps 4-5 of a block from its update ``u`` (``MergeMethod.finish``): ``base + lambda * sparsify(u)``."""
    return base + state.sparsify(u).mul_(p.lam)


def sar_state(p: SarParams, numel: int, dtype: torch.dtype, device: torch.device | str) -> SarState:
    return SarState(p, numel, dtype, device)


def sar_elementwise(p: SarParams) -> bool:
    return p.density >= 1
