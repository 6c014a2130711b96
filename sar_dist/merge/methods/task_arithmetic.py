"""The generalized task-arithmetic family: one merge function, ``task_arithmetic`` and ``ties``.

The other presets (DARE, Model Breadcrumbs, DELLA) are in ``task_arithmetic_presets``.

For each model ``d_i = x_i - base`` is sparsified on its own (per preset), then ``wd_i = w_i * d_i``.
With sign election: ``mask_i = sign(wd_i) == sign(sum_j wd_j)`` (a zero sum counts as +),
``mixed = sum_i wd_i * mask_i``, ``divisor = sum_i w_i * mask_i`` (0 -> 1). Without:
``mixed = sum_i wd_i``, ``divisor = sum_i w_i`` (|divisor| < 1e-8 -> 1). If ``normalize``,
``mixed /= divisor``; result ``base + lambda * mixed``. Semantics of mergekit 0.1.5
(``docs/methods.md``); all arithmetic stays in the input dtype, as there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sar_dist.merge import ops
from sar_dist.merge.base import ANY_REAL, REQUIRED, UNIT, TensorContext, method_param, per_model
from sar_dist.merge.methods.trim import EntrySparsifier, TrimState

TASK_ARITHMETIC_URL = "https://arxiv.org/abs/2212.04089"
TIES_URL = "https://arxiv.org/abs/2306.01708"


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskArithmeticParams:
    """Parameters of ``task_arithmetic``; the other presets subclass it to change defaults.

    Attributes:
        weights: per-model ``weight`` (required, as in mergekit).
        densities: per-model ``density`` (default 1.0; unused without sparsification, accepted like mergekit).
        lambda_: ``lambda``, scale of the merged update (default 1.0).
        normalize: ``normalize``, divide by the (elected) weight sum.
        rescale: ``rescale``, L1-norm match after sparsification.
        int8_mask: ``int8_mask``, accepted for compatibility; memory only in mergekit, no effect here.
    """

    weights: tuple[float, ...] = per_model(
        "weight", REQUIRED, valid=ANY_REAL, why="a negative weight subtracts a task vector, as in mergekit"
    )
    densities: tuple[float, ...] = per_model(
        "density", 1.0, valid=UNIT,
        why="the fraction of a task vector's entries kept, for DARE and DELLA the keep probability: 0 keeps none, 1 all",
    )
    lambda_: float = method_param(
        "lambda", 1.0, valid=ANY_REAL, why="the scale of the merged update: 0 gives the base, < 0 subtracts it"
    )
    normalize: bool = method_param("normalize", False)
    rescale: bool = method_param("rescale", False)
    int8_mask: bool = method_param("int8_mask", False)


@dataclass(frozen=True, kw_only=True, slots=True)
class TiesParams(TaskArithmeticParams):
    """``task_arithmetic``'s parameters with ``normalize`` on by default."""

    normalize: bool = method_param("normalize", True)


Sparsifier = Callable[[Tensor, int], Tensor]
"""``(delta, model_index) -> sparsified delta``, bound to one tensor's params and context."""


def generalized_task_arithmetic(
    tensors: Sequence[Tensor],
    base: Tensor,
    p: TaskArithmeticParams,
    *,
    sparsify: Sparsifier | None,
    elect: bool,
    sparse: EntrySparsifier | None = None,
) -> Tensor:
    """The family's merge (module docstring gives the formula); presets choose ``sparsify``/``elect``.

    With ``sparse`` (the same sparsifier on chosen entries), up to ``ops.ORDERED_SUM_MAX_MODELS``
    models on the CPU and finite weights, only the entries some model changed are computed
    (:func:`_changed_entries_merge`), with the same bits.

    Args:
        tensors: the non-base inputs, same shape and dtype as ``base``.
        base: the base model's tensor.
        p: resolved parameters (``weights`` has one value per input).
        sparsify: per-model sparsifier, or None for plain task vectors.
        elect: whether to apply TIES sign election.
        sparse: ``sparsify`` on chosen entries, or None (then every entry is computed).

    Returns:
        The merged tensor, in ``base``'s dtype.
    """
    num_models = len(tensors)
    assert len(p.weights) == num_models, "resolver must give one weight per model"
    weights = _weights(p, base)
    if (sparse is not None and num_models <= ops.ORDERED_SUM_MAX_MODELS and base.device.type == "cpu"
            and bool(torch.isfinite(weights).all())):
        return _changed_entries_merge(tensors, base, p, weights, sparse, elect)
    # Stacked like mergekit so the reductions over models round the same way in bf16/fp16.
    deltas = base.new_empty((num_models, *base.shape))
    for i, x in enumerate(tensors):
        torch.sub(x, base, out=deltas[i])
        if sparsify is not None:
            deltas[i] = sparsify(deltas[i], i)
    # Weights are rounded to the compute dtype, as mergekit does.
    deltas.mul_(weights)
    if elect:
        mask = ops.sign_consensus_mask(deltas)
        mixed = deltas.mul_(mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        del mask
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del deltas
    if p.normalize:
        mixed /= divisor
    if p.lambda_ != 1:
        mixed *= p.lambda_
    return base + mixed


def _weights(p: TaskArithmeticParams, base: Tensor) -> Tensor:
    """The weights rounded to the compute dtype, as mergekit does, shaped ``(K, 1, ...)`` against the models."""
    return torch.tensor(p.weights, dtype=base.dtype, device=base.device).view(len(p.weights), *([1] * base.dim()))


def _changed_entries_merge(
    tensors: Sequence[Tensor], base: Tensor, p: TaskArithmeticParams, weights: Tensor, sparse: EntrySparsifier,
    elect: bool,
) -> Tensor:
    """:func:`generalized_task_arithmetic` computed on the entries some model changed only.

    Where every ``x_i`` equals a finite base, each ``d_i`` is a signed zero, and so is every
    sparsified, weighted task vector (weights finite in the compute dtype; the sparsifier keeps
    zeros). A sum of signed zeros onto +0 is +0, so the elected signs agree nowhere (``mask_i``
    False), the mixed update is +0 and the elected divisor 0 -> 1: the merged entry is ``base + z``
    for the one ``z`` that the divisor and lambda make of +0, as in the dense formula. On the changed entries the same IEEE
    operations run in the same order (sums over the models in model order onto +0:
    ``ops.ordered_sum``, the order of the dense ``sum(dim=0)`` up to ``ops.ORDERED_SUM_MAX_MODELS``).
    """
    shape = base.shape
    flat = [x.reshape(-1) for x in tensors]
    base = base.reshape(-1)
    idx = ops.changed_entries(flat, base)
    # z: the dense formula's ops on a mixed update of +0
    zero = base.new_zeros(())
    divisor = None
    if not elect:  # the divisor of every entry, formed as the dense formula forms it
        divisor = weights.sum(dim=0).reshape(())
        divisor[divisor.abs() < 1e-8] = 1
    if p.normalize and divisor is not None:
        zero /= divisor
    if p.lambda_ != 1:
        zero *= p.lambda_
    out = base + zero
    if idx.numel() == 0:
        return out.view(shape)
    b = base.index_select(0, idx)
    w = weights.reshape(-1, 1)
    wd = [sparse(x.index_select(0, idx).sub_(b), i, idx).mul_(w[i]) for i, x in enumerate(flat)]
    if elect:
        positive = ops.ordered_sum(wd) >= 0
        mask = [torch.where(positive, t > 0, t < 0) for t in wd]
        mixed = ops.ordered_sum([t.mul_(m) for t, m in zip(wd, mask, strict=True)])
        divisor = ops.ordered_sum([w[i] * m for i, m in enumerate(mask)])
        divisor[divisor == 0] = 1
    else:
        mixed = ops.ordered_sum(wd)
    del wd
    if p.normalize:
        mixed /= divisor
    if p.lambda_ != 1:
        mixed *= p.lambda_
    return out.index_copy_(0, idx, b.add_(mixed)).view(shape)


def task_arithmetic(tensors: Sequence[Tensor], base: Tensor, p: TaskArithmeticParams, *, ctx: TensorContext) -> Tensor:
    """Task arithmetic (arXiv 2212.04089, https://arxiv.org/abs/2212.04089).

    ``base + lambda * sum_i w_i (x_i - base)``, divided by ``sum_i w_i`` when ``normalize`` (default off).

    Args:
        tensors: the non-base inputs.
        base: the base model's tensor.
        p: resolved parameters.
        ctx: tensor identity (unused: the method is deterministic).

    Returns:
        The merged tensor, in ``base``'s dtype.
    """
    return generalized_task_arithmetic(tensors, base, p, sparsify=None, elect=False)


FUSED_MAX_MODELS = 4
"""Up to this many models :func:`task_arithmetic_kernel` adds the weighted task vectors one by one
onto a +0 accumulator, the order torch's CPU ``sum(dim=0)`` of a ``(K, n)`` float32 tensor takes
for K <= 4 (the measurement ``ops.ORDERED_SUM_MAX_MODELS`` records); beyond, blocks keep the stacked sum."""


def task_arithmetic_kernel(
    p: TaskArithmeticParams, num_inputs: int, dtype: torch.dtype, device: torch.device | str
) -> Callable[[Sequence[Tensor], TensorContext], Tensor] | None:
    """A fused block kernel of ``task_arithmetic`` (``MergeMethod.kernel``), or None where it does not apply.

    The block function takes ``[base, x_1, ..., x_K]`` (compute dtype, one flat block each) and returns
    the merged block, bit-identical to :func:`task_arithmetic` on it: the same IEEE operations in the
    same order (``x_i - base``, times ``w_i`` rounded to the compute dtype, summed in model order onto
    +0, divided by the same divisor, times lambda, plus base), in two reused buffers instead of a
    ``(K, n)`` stack, a weights tensor and four temporaries per block. CPU and float32 only (the
    order of the sum was measured there).
    """
    if (dtype != torch.float32 or torch.device(device).type != "cpu" or not 1 <= num_inputs <= FUSED_MAX_MODELS):
        return None
    weights = torch.tensor(p.weights, dtype=dtype).view(num_inputs, 1)
    divisor = weights.sum(dim=0)  # as generalized_task_arithmetic forms it
    divisor[divisor.abs() < 1e-8] = 1
    scales = list(weights.view(-1).unbind(0))
    work: list[Tensor] = []

    def block(blocks: Sequence[Tensor], ctx: TensorContext) -> Tensor:
        base, inputs = blocks[0], blocks[1:]
        n = base.numel()
        if not work or work[0].numel() < n:
            work[:] = [torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)]
        acc, delta = work[0][:n].zero_(), work[1][:n]
        for x, w in zip(inputs, scales, strict=True):
            torch.sub(x, base, out=delta)
            acc.add_(delta.mul_(w))
        if p.normalize:
            acc.div_(divisor)
        if p.lambda_ != 1:
            acc.mul_(p.lambda_)
        return torch.add(base, acc, out=acc)  # base + mixed, operands in the same order

    return block


def ties_state(p: TiesParams, numel: int, dtype: torch.dtype, device: torch.device | str) -> TrimState:
    """The whole-tensor trim statistics ``ties`` needs, for a chunked run (see ``trim.py``)."""
    return TrimState(p.densities, p.rescale, numel, dtype, device)


def ties(
    tensors: Sequence[Tensor], base: Tensor, p: TiesParams, *, ctx: TensorContext, state: TrimState | None = None
) -> Tensor:
    """TIES-Merging (arXiv 2306.01708, https://arxiv.org/abs/2306.01708).

    Trim each ``d_i`` to its ``max(1, int(k_i * numel))`` largest magnitudes (density 1 keeps all),
    elect signs, ``base + lambda * sum_i w_i d_i m_i / sum_i w_i m_i`` (divisor only if ``normalize``).

    Args:
        tensors: the non-base inputs.
        base: the base model's tensor.
        p: resolved parameters.
        ctx: tensor identity (unused: deterministic).
        state: trim statistics gathered over the whole tensor when ``tensors`` and ``base`` are a
            block of rows (blocks then come in order); None computes them from the tensors given.

    Returns:
        The merged tensor, in ``base``'s dtype.
    """
    if state is None:  # the whole tensor is here: gather the trim statistics from it
        state = ties_state(p, base.numel(), base.dtype, base.device).run(tensors, base)
    return generalized_task_arithmetic(tensors, base, p, elect=True, sparsify=state.sparsify, sparse=state.sparse())
