"""Shared kernels of the merge methods: keyed randomness, exact top-k masks, sparsifiers, sign election.

Everything here is a pure tensor function: no I/O, no global RNG, no device moves except that keyed
random numbers are generated on the CPU (so every device sees the same stream) and then moved.

Sparsifier semantics follow mergekit 0.1.5's ``sparsify.py`` (see ``docs/methods.md``); the
implementations are our own: magnitude selection uses a radix select on the float bits instead of a
full argsort, and ties at the threshold are broken by flattened index (lowest first), so results are
deterministic.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from sar_dist.merge.base import TensorContext

BLOCK_NUMEL = 2**20
"""Elements per keyed random block; part of the stream definition, never change it."""

_CHUNK_NUMEL = 2**20  # working-set size of the chunked passes in topk_magnitude_mask
_RADIX_BITS = 16
_RESCALE_EPS = 1e-7  # mergekit's floor on both L1 norms before rescaling

# Integer views of float dtypes, and the mask that drops the sign bit (|x| as ordered integer bits).
_INT_VIEW: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFF_FFFF),
    torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF),
}


# --------------------------------------------------------------------------- keyed randomness


def block_seed(ctx: TensorContext, model_index: int, block_index: int) -> int:
    """The 63-bit generator seed of one random block.

    Args:
        ctx: tensor name and job seed.
        model_index: index of the non-base model (config order).
        block_index: index of the ``BLOCK_NUMEL``-element block in the flattened tensor.

    Returns:
        A non-negative integer below 2**63, from blake2b over the four keys.
    """
    payload = f"{ctx.seed}\x00{ctx.name}\x00{model_index}\x00{block_index}".encode()
    digest = hashlib.blake2b(payload, digest_size=8, person=b"sar-dist-unif").digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


RANDOM_BLOCKS_HELD = 8
"""Keyed random blocks kept after they are drawn (4 MiB each), least recently used dropped first:
the row blocks of a unit smaller than a random block (every model's, in turn) share one draw of it."""

_held_blocks: collections.OrderedDict[tuple[int, int], Tensor] = collections.OrderedDict()
_held_lock = threading.Lock()


def _random_block(seed: int, length: int) -> Tensor:
    """The first ``length`` values of ``torch.rand`` from a CPU generator seeded with ``seed``
    (a view of a held block when one at least that long was drawn recently)."""
    with _held_lock:
        for key, block in _held_blocks.items():
            if key[0] == seed and key[1] >= length:
                _held_blocks.move_to_end(key)
                return block[:length]
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    # a prefix of one generator's torch.rand stream is stable: more of the block than asked for is
    # drawn (the row blocks after this one ask for longer prefixes), up to the whole block
    block = torch.rand(BLOCK_NUMEL if 8 * length > BLOCK_NUMEL else 4 * length, generator=gen)
    with _held_lock:
        _held_blocks[(seed, block.numel())] = block
        while len(_held_blocks) > RANDOM_BLOCKS_HELD:
            _held_blocks.popitem(last=False)
    return block[:length]


def keyed_uniform_range(
    ctx: TensorContext, model_index: int, start: int, stop: int, device: torch.device | str | None = None
) -> Tensor:
    """Elements ``[start, stop)`` of the keyed uniform stream of one (tensor, model).

    Block ``b`` holds the first values of ``torch.rand`` from a CPU generator seeded with
    ``block_seed(ctx, model_index, b)``; only the blocks the range overlaps are generated (or taken
    from the :data:`RANDOM_BLOCKS_HELD` generated last), so a row-chunked caller gets exactly the
    values of :func:`keyed_uniform` and draws each random block about once.

    Args:
        ctx: tensor name and job seed.
        model_index: index of the non-base model (config order).
        start: first flattened element index (>= 0).
        stop: one past the last index (>= start).
        device: where to put the result (generated on the CPU first); None keeps the CPU.

    Returns:
        A 1-D float32 tensor of ``stop - start`` values in [0, 1).

    Raises:
        ValueError: if the range is invalid.
    """
    if not 0 <= start <= stop:
        raise ValueError(f"invalid random range [{start}, {stop}) for tensor {ctx.name!r}")
    out = torch.empty(stop - start, dtype=torch.float32)
    pos = start
    while pos < stop:
        block, offset = divmod(pos, BLOCK_NUMEL)
        end = min(stop - block * BLOCK_NUMEL, BLOCK_NUMEL)
        values = _random_block(block_seed(ctx, model_index, block), end)
        out[pos - start : pos - start + end - offset] = values[offset:]
        pos = block * BLOCK_NUMEL + end
    return out if device is None else out.to(device)


def keyed_uniform(ctx: TensorContext, model_index: int, numel: int, device: torch.device | str | None = None) -> Tensor:
    """The keyed uniform stream of one (tensor, model) for the ``numel`` elements starting at ``ctx.offset``.

    ``ctx.offset`` is 0 for a whole tensor and the flattened index of the first element when an
    executor passes a block of rows, so a chunked run draws exactly the whole-tensor values.

    Args:
        ctx: tensor name and job seed.
        model_index: index of the non-base model (config order).
        numel: number of values.
        device: where to put the result; None keeps the CPU.

    Returns:
        A 1-D float32 tensor of ``numel`` values in [0, 1), identical across runs and processes.
    """
    return keyed_uniform_range(ctx, model_index, ctx.offset, ctx.offset + numel, device)


# --------------------------------------------------------------------------- exact top-k by magnitude


# For IEEE floats, |x| orders like its bit pattern read as an integer (NaN above inf, as in sort),
# which is what MagnitudeSelector selects on.
class MagnitudeSelector:
    """Exact top-k of ``|x|`` over a tensor seen in pieces, in flattened order, over several passes.

    The ``num_keep``-th largest ``|x|`` is found by a radix select on the float bits (16 bits per
    pass; no sort, no index tensor): each resolving pass feeds every piece to :meth:`observe`, then
    :meth:`end_pass` fixes 16 more bits of the threshold. Once :meth:`needs_pass` is False,
    :meth:`mask` is called on the pieces again, in order: entries strictly above the threshold are
    kept, then the first entries equal to it in flattened order until ``num_keep`` are kept. The
    result does not depend on how the tensor is cut into pieces (row chunks of any size).

    Args:
        numel: elements in the whole tensor.
        num_keep: how many to keep; <= 0 keeps none, >= numel keeps all.
        dtype: the pieces' floating-point dtype.
        device: the pieces' device.
    """

    def __init__(self, numel: int, num_keep: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.numel, self.num_keep = numel, num_keep
        self._int_dtype, self._sign_mask = _INT_VIEW[dtype]
        self._total_bits = torch.finfo(dtype).bits
        self._device = device
        self._shift = self._total_bits - _RADIX_BITS
        self._prefix, self._remaining = 0, num_keep  # rank of the threshold among entries with this prefix
        self._hist: Tensor | None = None
        self._trivial = num_keep <= 0 or num_keep >= numel
        self._remaining_at_threshold = num_keep

    def resolve_from_values(self, magnitudes: Tensor) -> None:
        """Fix the threshold from every entry that can be kept: the resolving passes over them alone.

        Args:
            magnitudes: ``|x|`` of all nonzero entries of the whole tensor (any order), in the
                pieces' dtype. The zeros it leaves out rank below every nonzero entry, and
                ``num_keep`` is below the nonzero count, so each pass picks the same bucket with the
                same rank left as over the whole tensor: the same threshold and tie count.
        """
        assert not self._trivial and 0 < self.num_keep < magnitudes.numel()
        while self.needs_pass():
            self.observe(magnitudes)
            self.end_pass()

    def needs_pass(self) -> bool:
        """Whether another resolving pass over all pieces is needed."""
        return not self._trivial and self._shift >= 0

    def _bits(self, piece: Tensor) -> Tensor:
        """``|x|`` as non-negative integers in ``x``'s own width (the sign bit cleared)."""
        return piece.detach().reshape(-1).view(self._int_dtype) & self._sign_mask

    def _digit(self, bits: Tensor | np.ndarray) -> Tensor | np.ndarray:
        """This pass's 16 bits of each magnitude (the top digit needs no mask: the sign bit is clear)."""
        digit = bits >> self._shift
        return digit & (2**_RADIX_BITS - 1) if self._shift + _RADIX_BITS < self._total_bits else digit

    def observe(self, piece: Tensor) -> None:
        """Count one piece's magnitudes in this pass's histogram."""
        assert self.needs_pass()
        if self._hist is None:
            self._hist = torch.zeros(2**_RADIX_BITS, dtype=torch.long, device=self._device)
        top = self._shift + _RADIX_BITS < self._total_bits  # only magnitudes with the prefix count
        for part in piece.reshape(-1).split(_CHUNK_NUMEL):
            bits = self._bits(part)
            bn = numpy_view(bits)
            if bn is not None:  # on the CPU: numpy (see numpy_view)
                if top:
                    bn = bn[(bn >> (self._shift + _RADIX_BITS)) == self._prefix]
                self._hist += torch.from_numpy(np.bincount(self._digit(bn), minlength=2**_RADIX_BITS))
                continue
            if top:
                bits = bits[(bits >> (self._shift + _RADIX_BITS)) == self._prefix]
            self._hist += torch.bincount(self._digit(bits).long(), minlength=2**_RADIX_BITS)

    def end_pass(self) -> None:
        """Fix the next 16 bits of the threshold from this pass's histogram."""
        assert self._hist is not None, "a pass must observe the pieces"
        from_top = self._hist.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, self._remaining).item())  # first bucket reaching the rank
        self._remaining -= int(from_top[j - 1].item()) if j > 0 else 0
        self._prefix = (self._prefix << _RADIX_BITS) | (2**_RADIX_BITS - 1 - j)
        self._shift -= _RADIX_BITS
        self._hist = None
        self._remaining_at_threshold = self._remaining

    def rewind(self) -> None:
        """Start the masking over again from the first piece (e.g. one pass for norms, one to apply)."""
        self._remaining = self._remaining_at_threshold

    def mask(self, piece: Tensor) -> Tensor:
        """The keep-mask of the next piece (pieces in flattened order, after the passes)."""
        assert not self.needs_pass()
        if self._trivial:
            return torch.full(piece.shape, self.num_keep > 0, dtype=torch.bool, device=piece.device)
        bits = self._bits(piece)
        bn = numpy_view(bits)
        if bn is not None:  # on the CPU: numpy (see numpy_view)
            keep = bn > self._prefix
            if self._remaining > 0:  # ties at the threshold: the lowest flattened indices first
                equal = np.flatnonzero(bn == self._prefix)[: self._remaining]
                keep[equal] = True
                self._remaining -= equal.size
            return torch.from_numpy(keep).view(piece.shape)
        out = torch.empty(piece.numel(), dtype=torch.bool, device=piece.device)
        pos = 0
        for part in bits.split(_CHUNK_NUMEL):
            dst = out[pos : pos + part.numel()]
            torch.gt(part, self._prefix, out=dst)
            if self._remaining > 0:
                equal = part == self._prefix
                num_equal = int(equal.sum().item())
                if num_equal > self._remaining:  # deterministic tie-break: lowest flattened index first
                    cut = int(equal.nonzero()[self._remaining - 1, 0].item()) + 1
                    equal[cut:] = False
                    num_equal = self._remaining
                dst |= equal
                self._remaining -= num_equal
            pos += part.numel()
        return out.view(piece.shape)


def topk_magnitude_mask(x: Tensor, num_keep: int) -> Tensor:
    """Mask of exactly ``num_keep`` entries of ``x`` with the largest magnitude.

    :class:`MagnitudeSelector` over the whole tensor as one piece: ties at the threshold are
    broken by lowest flattened index.

    Args:
        x: a floating-point tensor (fp16, bf16, fp32 or fp64), any shape, any device.
        num_keep: how many entries to keep; <= 0 keeps none, >= numel keeps all.

    Returns:
        A bool tensor of ``x``'s shape with exactly ``clamp(num_keep, 0, numel)`` True entries.
    """
    selector = MagnitudeSelector(x.numel(), num_keep, x.dtype, x.device)
    while selector.needs_pass():
        selector.observe(x)
        selector.end_pass()
    return selector.mask(x)


# --------------------------------------------------------------------------- deterministic reductions


@contextmanager
def one_thread() -> Iterator[None]:
    """Run CPU reductions on one thread, so their result does not depend on the thread count.

    A whole-tensor float sum in torch splits the work by thread count (seen here: ``x.sum()``
    of 2**24 floats differs in the last bits between 1, 2 and 4 threads), and executors run
    with different counts (a Ray task gets its CPU share, the local executor all cores).
    Elementwise work and reductions over the model dimension are unaffected and stay parallel.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------- sums over the models


ORDERED_SUM_MAX_MODELS = 4
"""Up to this many models, torch's CPU ``sum(dim=0)`` of a ``(K, N)`` tensor adds the K rows in order
onto a +0 accumulator (float32 for bfloat16 and float16) at every N, which :func:`ordered_sum`
repeats on any subset of columns; for K >= 5 the order of the last columns depends on N (measured,
torch 2.13), so a sum over gathered entries could change bits and those merges keep dense formulas."""


def ordered_sum(rows: Sequence[Tensor]) -> Tensor:
    """``torch.stack(rows).sum(dim=0)`` in the order torch's CPU kernel takes for K <= 4
    (:data:`ORDERED_SUM_MAX_MODELS`), on tensors of any length: the rows added one by one onto +0."""
    dtype = rows[0].dtype
    acc_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    acc = torch.zeros(rows[0].shape, dtype=acc_dtype, device=rows[0].device)
    for row in rows:
        acc.add_(row)
    return acc.to(dtype)


def changed_entries(tensors: Sequence[Tensor], base: Tensor) -> Tensor:
    """Flat indices (int64, ascending) of the entries where some input's ``x - base`` may be other
    than +-0: the input differs from the base there, or the base is not finite (``inf - inf`` is NaN).

    Everywhere else every task vector is a signed zero, which RLVR updates mostly are. On the CPU the
    comparisons run in numpy (see :func:`numpy_view`); a bfloat16 tensor is compared by its bits,
    which also lists the entries where only the sign of a zero differs.
    """
    flat = base.reshape(-1)
    b = numpy_view(flat)
    if b is None:
        changed = ~torch.isfinite(flat)
        for x in tensors:
            changed.logical_or_(x.reshape(-1) != flat)
        return changed.nonzero().squeeze(1)
    if flat.dtype == torch.bfloat16:  # exponent bits all set: inf or NaN
        changed = (b & 0x7F80) == 0x7F80
    else:
        changed = ~np.isfinite(b)
    for x in tensors:
        xn = numpy_view(x.reshape(-1))
        changed |= xn != b
    return torch.from_numpy(np.flatnonzero(changed))


def flat_indices(mask: Tensor) -> Tensor:
    """The flat indices (int64, ascending) of a bool tensor's True entries (numpy's on the CPU)."""
    mn = numpy_view(mask.reshape(-1))
    return mask.reshape(-1).nonzero().squeeze(1) if mn is None else torch.from_numpy(np.flatnonzero(mn))


def numpy_view(t: Tensor) -> np.ndarray | None:
    """A zero-copy numpy view of a contiguous CPU tensor (bfloat16 as its int16 bits), or None.

    For comparisons, masks and index lists on the CPU: torch 2.13's CPU kernels that make a bool
    tensor and ``nonzero`` are much slower than numpy's (measured on 2 vCPU, 2**20 float32 entries:
    ``x > 0`` 644 vs 65 us, ``isfinite`` 2209 vs 79 us, ``nonzero`` of a random mask 5872 vs
    681 us). Arithmetic stays in torch.
    """
    if t.device.type != "cpu" or not t.is_contiguous() or t.requires_grad:
        return None
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    if t.dtype in (torch.float16, torch.float32, torch.float64, torch.bool, torch.int16, torch.int32, torch.int64):
        return t.numpy()
    return None


def nonzero_values(x: Tensor) -> Tensor:
    """The entries of a 1-D tensor that are not +-0 (NaN included), in order."""
    xn = numpy_view(x) if x.dtype != torch.bfloat16 else None  # bf16's bits: -0 is not 0 there
    if xn is None:
        return x[x != 0]
    # an index list, then a gather: 4x faster than indexing by the bool mask (259K float32 entries,
    # 14% nonzero: 163 vs 625 us on 2 vCPU)
    return torch.from_numpy(xn[np.flatnonzero(xn != 0)])


# --------------------------------------------------------------------------- sparsifiers


def _rows(x: Tensor) -> Tensor:
    """``x`` as rows (first dimension) of its other entries; a 0-d tensor is one row of one entry."""
    return x.reshape(x.shape[0], -1) if x.dim() else x.reshape(1, 1)


def row_l1(x: Tensor, out: Tensor | None = None) -> Tensor:
    """Per-row float64 L1 sums (rows = first dimension): the same values however a tensor is
    cut into row blocks, and for any thread count (each row is reduced by one thread).
    ``out``: where to write them (e.g. a slot of :class:`RowSums`)."""
    if out is None:
        return _rows(x).abs().sum(dim=1, dtype=torch.float64)
    return torch.sum(_rows(x).abs(), dim=1, dtype=torch.float64, out=out)


class RowSums:
    """Per-row float64 sums of a tensor of ``numel`` entries seen in row blocks, in order, written
    into one vector made at the first block (:meth:`slot` gives each block's part).

    The same values as concatenating a small tensor of sums per block, without those small
    tensors: kept alive between each block's large temporaries, they fragmented glibc's heap
    (measured: a DARE norms pass over a 32000 x 2048 tensor in row blocks grew the process by
    about 24 bytes per entry, to 2.1 GB at a 1 GiB budget).
    """

    def __init__(self, numel: int):
        self.numel = numel
        self._sums: Tensor | None = None
        self._filled = 0

    def slot(self, x: Tensor) -> Tensor:
        """The part of the vector for the row block ``x`` (the next rows)."""
        rows = _rows(x)
        stop = self._filled + rows.shape[0]
        if self._sums is None or self._sums.numel() < stop:
            # sized for the whole tensor at the first block (its rows are this wide); grown only
            # if they are not (zero-width rows, where numel says nothing of the row count)
            total = max(stop, self.numel // rows.shape[1] if rows.shape[1] else 0)
            grown = torch.empty(total, dtype=torch.float64, device=x.device)
            if self._sums is not None:
                grown[:self._filled] = self._sums[:self._filled]
            self._sums = grown
        part = self._sums[self._filled:stop]
        self._filled = stop
        return part

    def pieces(self) -> list[Tensor]:
        """The sums so far, as one piece (for :func:`rescale_factor`)."""
        return [] if self._sums is None else [self._sums[:self._filled]]


def keeps_zeros(factors: Sequence[Tensor | None]) -> bool:
    """Whether rescaling by each of ``factors`` (None: no rescale) maps a signed zero to a signed zero:
    every factor is finite (``0 * inf`` is NaN)."""
    return all(f is None or bool(torch.isfinite(f)) for f in factors)


def rescale_factor(before: Sequence[Tensor], after: Sequence[Tensor], dtype: torch.dtype) -> Tensor | None:
    """``||d||_1 / ||masked||_1`` from :func:`row_l1` pieces, or None when either is below 1e-7.

    The float64 sums are rounded to the compute dtype and divided in it, which is what mergekit's
    ``masked * (before / after)`` computes, up to its own summation order.
    """
    with one_thread():
        b = torch.cat(list(before)).sum().to(dtype)
        a = torch.cat(list(after)).sum().to(dtype)
    return b / a if b >= _RESCALE_EPS and a >= _RESCALE_EPS else None


def masked_rescale(delta: Tensor, mask: Tensor, rescale: bool) -> Tensor:
    """Apply a keep-mask, optionally matching the L1 norm of the unmasked tensor.

    ``masked * (||delta||_1 / ||masked||_1)`` (mergekit's L1 rescale), skipped when either norm is
    below 1e-7; the factor comes from :func:`rescale_factor`, the one rescale formula of every
    sparsifier, whole-tensor or in row blocks.

    Args:
        delta: the task vector.
        mask: bool (or 0/1) keep-mask of the same shape.
        rescale: whether to rescale.

    Returns:
        The masked (and rescaled) tensor, in ``delta``'s dtype.
    """
    # Multiplying (not masked_fill) gives the same bits as mergekit's float-mask product.
    masked = delta * mask
    if not rescale:
        return masked
    factor = rescale_factor([row_l1(delta)], [row_l1(masked)], delta.dtype)
    return masked if factor is None else masked.mul_(factor)


def outlier_band(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs' kept band of magnitude ranks: ``[num_lo, num_hi)`` in descending ``|d|`` order.

    In ascending order the kept entries are positions ``[n_bot, n_bot + n_keep)`` with
    ``n_keep = int(density * numel)``, ``n_top = int(gamma * numel)`` and
    ``n_bot = max(0, numel - n_keep - n_top)``: when ``n_keep + n_top > numel`` fewer outliers are
    dropped so the density holds (mergekit's rule). In descending order that is the top
    ``num_hi = num_lo + n_keep`` minus the top ``num_lo`` (the outliers actually dropped).

    Args:
        numel: elements in the whole tensor.
        density: fraction to keep (< 1).
        gamma: fraction of largest-magnitude outliers to drop.

    Returns:
        ``(num_hi, num_lo)``, both in ``[0, numel]``.
    """
    num_keep = max(0, int(density * numel))
    num_top = int(gamma * numel)
    num_bot = max(0, numel - num_keep - num_top)
    num_lo = max(0, numel - num_bot - num_keep)
    return num_lo + num_keep, num_lo


def keyed_keep_mask(delta: Tensor, density: float, ctx: TensorContext, model_index: int) -> Tensor:
    """DARE's keep-mask ``u < density`` from the keyed uniform stream at ``ctx.offset``."""
    keep = below(keyed_uniform(ctx, model_index, delta.numel()), density)
    return keep.view(delta.shape).to(delta.device)


def below(u: Tensor, p: float) -> Tensor:
    """``u < p`` for float32 ``u`` on the CPU, compared in float32 as torch compares a tensor with a
    Python number (in numpy: see :func:`numpy_view`)."""
    return torch.from_numpy(u.numpy() < np.float32(p))


def mask_product(x: Tensor, keep: Tensor) -> Tensor:
    """``x * keep`` for a bool ``keep`` of ``x``'s shape: ``x`` where kept, a zero of ``x``'s sign
    (NaN for inf and NaN) elsewhere, the IEEE product by 1 or 0 (in numpy on the CPU, where torch's
    float-by-bool product is slow: 1181 vs 249 us for 2**20 float32 entries on 2 vCPU)."""
    xn = numpy_view(x) if x.dtype != torch.bfloat16 else None  # bf16 is viewed as bits: no product
    kn = numpy_view(keep) if xn is not None else None
    if xn is None or kn is None:
        return x * keep
    with np.errstate(invalid="ignore"):  # inf * 0 is NaN, as in torch
        return torch.from_numpy(np.multiply(xn, kn, dtype=xn.dtype))


def random_sparsify(delta: Tensor, density: float, rescale: bool, *, ctx: TensorContext, model_index: int) -> Tensor:
    """DARE drop: keep each entry with probability ``density`` (keyed Bernoulli mask ``u < density``).

    Args:
        delta: the task vector.
        density: keep probability; >= 1 returns ``delta`` unchanged.
        rescale: L1-norm rescale after masking (DARE's default).
        ctx: tensor identity, keys the random stream.
        model_index: index of the model (config order), keys the random stream.

    Returns:
        The sparsified tensor, in ``delta``'s dtype.
    """
    if density >= 1:
        return delta
    return masked_rescale(delta, keyed_keep_mask(delta, density, ctx, model_index), rescale)


def della_keep_mask(delta: Tensor, density: float, epsilon: float, *, ctx: TensorContext, model_index: int) -> Tensor:
    """DELLA MagPrune's keep-mask ``u < p``, ``p`` rising with the magnitude rank of an entry in its row.

    Ranks run along dim 1 (a 1-D or 0-D tensor is one row); ``r = (rank - 1) / (ncols - 1)`` and
    ``p = density - epsilon + 2 * epsilon * r``. Probabilities are computed in float32 (mergekit
    rounds the ranks to bf16 for bf16 inputs, a precision artifact not copied); equal magnitudes get
    ranks by index (stable sort). A one-column row gets r = 0 (mergekit divides 0 by 0 there).
    The ranks of a row never look past the row, and ``u`` is the keyed stream at ``ctx.offset``,
    so a block of whole rows of a tensor with >= 2 dims gets exactly its part of the whole mask.

    Args:
        delta: the task vector (or a block of its rows).
        density: mean keep probability, in (0, 1).
        epsilon: half-width of the probability range.
        ctx: tensor identity, keys the random stream.
        model_index: index of the model (config order), keys the random stream.

    Returns:
        A bool tensor of ``delta``'s shape.

    Raises:
        ValueError: unless ``0 < density - epsilon`` and ``density + epsilon < 1``.
    """
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della: density {density} +/- epsilon {epsilon} must lie in (0, 1) "
            f"(tensor {ctx.name!r}, model {model_index})"
        )
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    ncols = rows.shape[1]
    order = rows.abs().argsort(dim=1, stable=True)
    shape = [1] * rows.dim()
    shape[1] = ncols
    rank = torch.arange(ncols, dtype=torch.float32, device=delta.device).view(shape).expand(rows.shape)
    probs = torch.empty(rows.shape, dtype=torch.float32, device=delta.device).scatter_(1, order, rank)
    del order
    probs.mul_(2 * epsilon / max(ncols - 1, 1)).add_(density - epsilon)
    u = keyed_uniform(ctx, model_index, delta.numel(), delta.device).view(rows.shape)
    return (u < probs).view(delta.shape)


def della_sparsify(
    delta: Tensor, density: float, epsilon: float, rescale: bool, *, ctx: TensorContext, model_index: int
) -> Tensor:
    """DELLA MagPrune: keep each entry with a probability rising with its magnitude rank in its row.

    The mask of :func:`della_keep_mask`, then the L1 rescale (:func:`masked_rescale`): the
    single-tensor form of ``drop.DellaState``, which the ``della`` methods run with the same mask
    and rescale formula, whole or in row blocks.

    Args:
        delta: the task vector.
        density: mean keep probability; >= 1 returns ``delta`` unchanged, <= 0 zeros.
        epsilon: half-width of the probability range.
        rescale: L1-norm rescale after masking (DELLA's default).
        ctx: tensor identity, keys the random stream.
        model_index: index of the model (config order), keys the random stream.

    Returns:
        The sparsified tensor, in ``delta``'s dtype.

    Raises:
        ValueError: unless ``0 < density - epsilon`` and ``density + epsilon < 1``.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    mask = della_keep_mask(delta, density, epsilon, ctx=ctx, model_index=model_index)
    return masked_rescale(delta, mask, rescale)


# --------------------------------------------------------------------------- sign election


def sign_consensus_mask(weighted: Tensor) -> Tensor:
    """TIES sign election over stacked weighted task vectors.

    ``majority = +1 where sum_i wd_i >= 0 else -1``; ``mask_i = sign(wd_i) == majority`` (zeros and
    NaNs never agree).

    Args:
        weighted: stacked ``w_i * d_i``, shape ``(num_models, *shape)``.

    Returns:
        A bool tensor of the same shape.
    """
    # The sum is reduced over dim 0 like mergekit, so reduced-precision rounding matches.
    positive = weighted.sum(dim=0) >= 0
    return torch.where(positive, weighted > 0, weighted < 0)
