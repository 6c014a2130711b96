"""Magnitude and random sparsifiers as whole-tensor states gathered in passes, so huge tensors
can be merged in row chunks with exactly the result of the whole-tensor merge.

:class:`BandState` keeps, per model ``i``, a band of magnitude ranks of ``d_i = x_i - base``: the
``num_hi`` largest ``|d_i|`` minus the ``num_lo`` largest (ties at a threshold by lowest flattened
index), optionally L1-rescaled ``masked * (||d_i||_1 / ||masked||_1)`` (docs/methods.md). TIES' trim
(:class:`TrimState`) is the band ``[0, max(1, int(k_i * numel)))``; Model Breadcrumbs
(:class:`OutlierState`) drops the top ``gamma`` outliers and keeps ``int(k_i * numel)`` below them.
Passes, each over all row chunks in order:
1. count the nonzero entries of each ``d_i``: a band reaching past them keeps every nonzero entry
   (RLVR task vectors are mostly exact zeros), and a band starting past them keeps none, so a
   threshold is needed only inside the nonzero count (which entries of a zero are kept does not
   change a bit of ``d_i * mask``);
2. find each exact threshold: one ``kthvalue`` over the nonzero magnitudes kept from pass 1 when
   they are few (at most 2**22 per model: 16 MiB in fp32, whatever the tensor size), else a radix
   select on the float bits (``ops.MagnitudeSelector``: 2 passes for fp32, 1 for bf16);
3. with ``rescale``: both L1 norms, as float64 sums of per-row float64 sums (identical for any
   chunking and thread count), then rounded to the compute dtype as mergekit's sums are.
Then the merge runs chunk by chunk with :meth:`BandState.sparsify`.

Masks that a block of rows determines alone (DARE's keyed Bernoulli drop, DELLA's per-row ranks)
need only pass 3: :mod:`sar_dist.merge.methods.drop`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sar_dist.merge import ops
from sar_dist.merge.base import TensorContext

EntrySparsifier = Callable[[Tensor, int, Tensor], Tensor]
"""``(values, model_index, positions) -> sparsified values``: a sparsifier of one row chunk on some
of its entries only (``positions``: their flat indices in the chunk, ascending; ``values``: the task
vector there), giving exactly the sparsified task vector at those entries. It is asked only for the
entries where some model changed the base, which include every entry it could keep, and it maps a
signed zero to a signed zero (``task_arithmetic.generalized_task_arithmetic(sparse=)``)."""

MAX_KEPT_MAGNITUDES = 2**22
"""Nonzero magnitudes a model may keep from the counting pass (a fixed bound, so the memory of
the state stays small beside the budget even for a 128k x 8192 embedding; more falls back to radix)."""



def band_state_bytes(rows: int, numel: int, itemsize: int) -> int:
    """Most bytes :class:`BandState` holds per model for a tensor of ``rows`` x ... = ``numel``:
    the kept nonzero magnitudes (compute dtype), two radix histograms of 2**16 int64 counts when
    the magnitudes do not all fit, and two float64 L1 sums per row."""
    kept = min(numel, MAX_KEPT_MAGNITUDES) * itemsize
    histograms = 2 * 2**16 * 8 if numel > MAX_KEPT_MAGNITUDES else 0
    return kept + histograms + 2 * rows * 8


_PASS, _EMPTY, _MASK = "pass", "empty", "mask"  # a band keeps every nonzero entry / none / some


class BandState:
    """Whole-tensor statistics of a band of magnitude ranks kept from each model's task vector.

    Holds per model the nonzero count, at most ``MAX_KEPT_MAGNITUDES`` magnitudes during the
    counting pass, two radix histograms (2**16 counts each) and per-row float64 L1 sums: never a
    copy of the tensor.

    Args:
        bands: per model ``(num_hi, num_lo)``: keep the ``num_hi`` largest ``|d_i|`` but not the
            ``num_lo`` largest; None leaves that model's task vector untouched.
        rescale: whether to L1-rescale each masked task vector.
        numel: elements in the whole tensor.
        dtype: compute dtype.
        device: compute device.
    """

    def __init__(self, bands: Sequence[tuple[int, int] | None], rescale: bool, numel: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.bands, self.rescale, self.numel = tuple(bands), rescale, numel
        self._dtype, self._device = dtype, device
        num_models = len(self.bands)
        self._kinds: list[str | None] = [None] * num_models
        self._nonzero = [0] * num_models
        self._hi: list[ops.MagnitudeSelector | None] = [None] * num_models
        self._lo: list[ops.MagnitudeSelector | None] = [None] * num_models
        self._factors: list[Tensor | None] = [None] * num_models
        self._phase = "count" if any(b is not None for b in self.bands) else "ready"
        self._l1: list[tuple[ops.RowSums, ops.RowSums]] = []
        self._values: list[list[Tensor] | None] = [[] for _ in self.bands]
        self._num_values = [0] * num_models

    def needs_pass(self) -> bool:
        """Whether another pass over all row chunks (in order) is needed."""
        return self._phase != "ready"

    def observe(self, tensors: Sequence[Tensor], base: Tensor, ctx: TensorContext | None = None) -> None:
        """Feed one row chunk of the inputs (compute dtype) during a pass (``ctx`` unused)."""
        if self._phase == "count":  # nonzero task-vector entries lie where some model changed the base
            idx = ops.changed_entries(tensors, base)
            b = base.reshape(-1).index_select(0, idx)
            self._observe_deltas([x.reshape(-1).index_select(0, idx).sub_(b) if self.bands[i] is not None else None
                                  for i, x in enumerate(tensors)])
            return
        self._observe_deltas([x - base if self.bands[i] is not None else None for i, x in enumerate(tensors)])

    def _selectors(self) -> list[ops.MagnitudeSelector]:
        return [s for s in (*self._hi, *self._lo) if s is not None]

    def _observe_deltas(self, deltas: Sequence[Tensor | None]) -> None:
        for i, d in enumerate(deltas):
            if d is None:
                continue
            if self._phase == "count":
                self._count(d, i)
            elif self._phase == "select":
                for sel in (self._hi[i], self._lo[i]):
                    if sel is not None and sel.needs_pass():
                        sel.observe(d)
            elif self._phase == "norms" and self._kinds[i] == _MASK:
                before, after = self._l1[i]
                ops.row_l1(d, out=before.slot(d))
                ops.row_l1(d * self._mask(d, i), out=after.slot(d))

    def _count(self, d: Tensor, i: int) -> None:
        nz = ops.nonzero_values(d.reshape(-1))
        self._nonzero[i] += nz.numel()
        # keep the nonzero magnitudes while they are few (sparse RLVR updates): the exact
        # thresholds are then one selection on them, with no radix passes
        values = self._values[i]
        if values is not None and self._num_values[i] + nz.numel() <= MAX_KEPT_MAGNITUDES:
            values.append(nz.abs())
            self._num_values[i] += nz.numel()
        else:
            self._values[i] = None

    def _plan_band(self, i: int) -> None:
        """After counting: whether model ``i``'s band needs thresholds, and which."""
        band = self.bands[i]
        if band is None:
            return
        num_hi, num_lo = band
        nonzero = self._nonzero[i]
        if num_hi >= nonzero and num_lo <= 0:
            self._kinds[i] = _PASS
            return
        if num_hi <= num_lo or num_lo >= nonzero:
            self._kinds[i] = _EMPTY
            return
        self._kinds[i] = _MASK
        values = self._values[i]
        kept = torch.cat(values) if values is not None else None
        for sels, num in ((self._hi, num_hi), (self._lo, num_lo)):
            if 0 < num < nonzero:  # else no threshold: every nonzero entry is in (hi) or none is out (lo)
                sel = ops.MagnitudeSelector(self.numel, num, self._dtype, self._device)
                if kept is not None:
                    sel.resolve_from_values(kept)
                sels[i] = sel

    def end_pass(self) -> None:
        """Close a pass: decide the next one."""
        if self._phase == "count":
            for i in range(len(self.bands)):
                self._plan_band(i)
            self._values = []
            self._phase = "select"
        elif self._phase == "select":
            for sel in self._selectors():
                if sel.needs_pass():
                    sel.end_pass()
        elif self._phase == "norms":
            for i, (before, after) in enumerate(self._l1):
                if self._kinds[i] == _MASK:
                    self._factors[i] = ops.rescale_factor(before.pieces(), after.pieces(), self._dtype)
            for sel in self._selectors():
                sel.rewind()
            self._l1 = []
            self._phase = "ready"
            return
        if self._phase == "select" and not any(s.needs_pass() for s in self._selectors()):
            if self.rescale and _MASK in self._kinds:
                self._phase = "norms"
                self._l1 = [(ops.RowSums(self.numel), ops.RowSums(self.numel)) for _ in self.bands]
            else:
                self._phase = "ready"

    def run(self, tensors: Sequence[Tensor], base: Tensor) -> BandState:
        """All passes over a whole tensor given as one chunk (its task vectors computed once)."""
        if not self.needs_pass():
            return self
        return self.run_deltas([x - base if self.bands[i] is not None else None for i, x in enumerate(tensors)])

    def run_deltas(self, deltas: Sequence[Tensor | None]) -> BandState:
        """All passes over whole task vectors (None for a model that is not masked)."""
        while self.needs_pass():
            self._observe_deltas(deltas)
            self.end_pass()
        return self

    def _mask(self, delta: Tensor, i: int) -> Tensor:
        hi, lo = self._hi[i], self._lo[i]
        mask = hi.mask(delta) if hi is not None else None
        if lo is not None:
            mask = ~lo.mask(delta) if mask is None else mask.logical_and_(~lo.mask(delta))
        assert mask is not None, "a masked band has at least one threshold"
        return mask

    def sparse(self) -> EntrySparsifier | None:
        """:meth:`sparsify` on the changed entries of the next row chunk
        (``generalized_task_arithmetic(sparse=)``), or None where a rescale factor is not finite (a
        signed zero would not stay one).

        A band's mask at an entry depends on its magnitude and, for magnitudes equal to a threshold,
        on how many equal ones come before it in flattened order; a threshold is a nonzero
        magnitude (it lies inside the nonzero count), so every entry equal to it has a nonzero task
        vector and is among the changed entries, in the same order.
        """
        if not ops.keeps_zeros(self._factors):
            return None
        return lambda values, i, positions: self.sparsify(values, i)

    def sparsify(self, delta: Tensor, i: int) -> Tensor:
        """Mask the next row chunk of model ``i``'s task vector (chunks in order, after the passes)."""
        assert not self.needs_pass()
        kind = self._kinds[i]
        if kind is None or kind == _PASS:  # untouched, or every nonzero kept (the rescale is then 1)
            return delta
        if kind == _EMPTY:  # no nonzero entry kept; the product keeps the zeros' signs, as a mask does
            return delta * False
        masked = delta * self._mask(delta, i)
        factor = self._factors[i]
        return masked.mul_(factor.to(masked.device)) if self.rescale and factor is not None else masked


class TrimState(BandState):
    """TIES' trim: per model with ``0 < k_i < 1`` keep the ``max(1, int(k_i * numel))`` largest ``|d_i|``.

    Args:
        densities: ``k_i`` per model (>= 1 keeps all, <= 0 zeros).
        rescale: whether to L1-rescale each trimmed task vector.
        numel: elements in the whole tensor.
        dtype: compute dtype.
        device: compute device.
    """

    def __init__(self, densities: Sequence[float], rescale: bool, numel: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.densities = tuple(densities)
        bands = [(max(1, int(k * numel)), 0) if 0 < k < 1 else None for k in self.densities]
        super().__init__(bands, rescale, numel, dtype, device)

    def sparsify(self, delta: Tensor, i: int) -> Tensor:
        """Trim the next row chunk of model ``i``'s task vector (chunks in order, after the passes)."""
        if self.densities[i] <= 0:
            return torch.zeros_like(delta)
        return super().sparsify(delta, i)


class OutlierState(BandState):
    """Model Breadcrumbs' ``magnitude_outliers``: the band of :func:`ops.outlier_band` per model.

    Args:
        densities: ``k_i`` per model (>= 1 keeps all).
        gammas: fraction of largest-magnitude outliers dropped, per model.
        rescale: whether to L1-rescale each masked task vector.
        numel: elements in the whole tensor.
        dtype: compute dtype.
        device: compute device.
    """

    def __init__(self, densities: Sequence[float], gammas: Sequence[float], rescale: bool, numel: int,
                 dtype: torch.dtype, device: torch.device | str):
        bands = [ops.outlier_band(numel, k, g) if k < 1 else None for k, g in zip(densities, gammas, strict=True)]
        super().__init__(bands, rescale, numel, dtype, device)


def magnitude_outliers_sparsify(delta: Tensor, density: float, gamma: float, rescale: bool) -> Tensor:
    """Breadcrumbs of one whole task vector: drop the ``int(gamma * numel)`` largest ``|d|`` and the
    smallest, keeping ``int(density * numel)`` (the band of :func:`ops.outlier_band`).

    The single-tensor form of :class:`OutlierState` (the code ``breadcrumbs`` runs).

    Args:
        delta: the task vector.
        density: fraction to keep; >= 1 returns ``delta`` unchanged.
        gamma: fraction of largest-magnitude outliers to drop.
        rescale: L1-norm rescale after masking.

    Returns:
        The sparsified tensor, in ``delta``'s dtype.
    """
    state = OutlierState((density,), (gamma,), rescale, delta.numel(), delta.dtype, delta.device)
    return state.run_deltas([delta]).sparsify(delta, 0)


def magnitude_sparsify(delta: Tensor, density: float, rescale: bool) -> Tensor:
    """TIES trim of one whole task vector: keep the ``max(1, int(density * numel))`` largest ``|d|``.

    The single-tensor form of :class:`TrimState` (the code ``ties`` runs).

    Args:
        delta: the task vector.
        density: fraction to keep; >= 1 returns ``delta`` unchanged (no rescale), <= 0 zeros.
        rescale: L1-norm rescale after masking.

    Returns:
        The sparsified tensor, in ``delta``'s dtype.
    """
    state = TrimState((density,), rescale, delta.numel(), delta.dtype, delta.device)
    return state.run_deltas([delta]).sparsify(delta, 0)
