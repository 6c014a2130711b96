"""Non-finite values (NaN, +inf, -inf) stop a run: cheap checks on tensors as they stream.

A fine-tune with a NaN entry gives NaN merged entries for most methods, silently. The merge
stage checks every floating-point tensor (or row block) it reads and every merged block before
it is written; the Fisher stage checks each example's loss and the statistics before writing.
A failed check raises :class:`NonFiniteError`, a ``ValueError`` (the CLI exits 2 with its one
line). ``allow_nonfinite: true`` in a config turns the checks off.

The test is one reduction at memory speed: ``x.sum()`` is finite only if every entry is
(NaN and +-inf absorb under addition, in any summation order). A non-finite sum means a
non-finite entry *or* an overflow of the sum of finite entries (values near the dtype's
maximum, or float16 sums past 65504), so only then is the tensor looked at exactly
(``torch.aminmax``: min and max propagate NaN), and only when that confirms it are the
NaN/+inf/-inf counted for the message. ``torch.isfinite(x).all()`` is exact too but
allocates a bool tensor and runs ~20x slower on CPU; ``torch.aminmax`` is one pass but about
half the speed of ``sum`` on bf16 and fp32 (measured: ``bench/finite_bench.py --micro``).
Integer and bool tensors are never checked.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NonFiniteError", "all_finite", "check_finite", "describe", "OPT_OUT"]

OPT_OUT = "set allow_nonfinite: true in the config to accept them"
_FLOAT8 = frozenset(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                    if hasattr(torch, n))
_PIECE = 1 << 22  # elements of a float8 tensor widened to float32 at a time


class NonFiniteError(ValueError):
    """A tensor holds NaN or infinite values (bad input: exit 2, one line naming model and tensor)."""


def _pieces(x: torch.Tensor):
    """Float8 has no ``sum``: widen bounded pieces to float32 (same values, exactly)."""
    flat = x.reshape(-1)
    for i in range(0, flat.numel(), _PIECE):
        yield flat[i: i + _PIECE].float()


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite (always True for integer and bool tensors)."""
    if not x.is_floating_point() or x.numel() == 0:
        return True
    if x.dtype in _FLOAT8:
        return all(all_finite(p) for p in _pieces(x))
    # one pass, no allocation: a finite sum proves every entry finite
    if math.isfinite(x.sum().item()):
        return True
    # a non-finite entry, or finite entries whose sum overflowed (e.g. float16 weights summing
    # past 65504): decide exactly, still in one pass (min and max propagate NaN)
    lo, hi = torch.aminmax(x)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def counts(x: torch.Tensor) -> tuple[int, int, int]:
    """(NaN, +inf, -inf) entries of ``x``; only computed once a check has failed."""
    if x.dtype in _FLOAT8:
        totals = [counts(p) for p in _pieces(x)]
        return tuple(sum(c[i] for c in totals) for i in range(3))  # type: ignore[return-value]
    return int(torch.isnan(x).sum()), int(torch.isposinf(x).sum()), int(torch.isneginf(x).sum())


def describe(x: torch.Tensor) -> str:
    """``3 NaN, 1 +inf, 0 -inf of 4,096 values`` for a tensor that failed the check."""
    nan, pos, neg = counts(x)
    return f"{nan:,} NaN, {pos:,} +inf, {neg:,} -inf of {x.numel():,} values"


def check_finite(x: torch.Tensor, what: str, tensor: str, *, rows: tuple[int, int] | None = None,
                 total_rows: int | None = None, span: str = "", note: str = "") -> None:
    """Raise :class:`NonFiniteError` unless every entry of ``x`` is finite.

    Args:
        x: the tensor or row block.
        what: whose it is, e.g. ``model s3://bucket/ft1`` or ``merged output /out``.
        tensor: the checkpoint tensor name.
        rows: the block's row range when ``x`` is a block of rows of the tensor.
        total_rows: the tensor's number of rows (with ``rows``).
        span: which part of the tensor ``x`` is, in words (instead of ``rows``).
        note: appended to the message (e.g. how an overflow came about).
    """
    if all_finite(x):
        return
    if rows is not None:
        span = f"rows {rows[0]}-{rows[1] - 1} of {total_rows}"
    where = f" ({span})" if span else ""
    extra = f"; {note}" if note else ""
    raise NonFiniteError(f"{what}: tensor '{tensor}'{where} has non-finite values ({describe(x)}){extra}; {OPT_OUT}")
