"""Spherical linear interpolation between the base and one other model, computed in float32.

The angle needs the norms and the dot product of the two flattened tensors. As in mergekit 0.1.5
they are reductions over 2**20-element chunks of the flattened tensors (a norm is the norm of the
chunk norms, the dot the sum of the chunk dots), one thread each, so the bits are fixed by the
chunk boundaries alone. :class:`SlerpState` gathers them in two passes over row blocks whose ends
need not fall on a chunk boundary: it carries the unfinished chunk into the next block, so every
chunk is reduced exactly as in the whole-tensor run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sar_dist.merge import ops
from sar_dist.merge.base import REQUIRED, UNIT, TensorContext, method_param

SLERP_URL = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#slerp-slerp"

_CHUNK_NUMEL = 2**20  # reduction chunk (mergekit's); also bounds the float32 scratch
_NORM_EPS = 1e-8
_DOT_THRESHOLD = 0.9995


@dataclass(frozen=True, kw_only=True, slots=True)
class SlerpParams:
    """Parameters of ``slerp``.

    Attributes:
        t: ``t``, interpolation factor (required): 0 gives the base, 1 the other model.
    """

    t: float = method_param(
        "t", REQUIRED, valid=UNIT, why="an interpolation factor: 0 gives the base, 1 the other model"
    )


def _coefficients(dot: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(sin((1 - t) theta) / sin(theta), sin(t theta) / sin(theta))``, or the lerp's ``(1 - t, t)``."""
    dot = dot.clamp(-1, 1)
    if dot.abs() > _DOT_THRESHOLD:  # nearly collinear: sin(theta) ~ 0, use lerp
        return 1 - t, t
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - t) * theta) / sin_theta, torch.sin(t * theta) / sin_theta


class SlerpState:
    """The coefficients of one tensor's slerp, from the two inputs seen in row blocks, in order.

    Passes: (1) the 2**20-element chunk norms of both flattened tensors, (2) the chunk dots of the
    normalized chunks. Holds one scalar per chunk and a buffer for the unfinished chunk of each
    input (``min(numel, 2**20)`` elements each: at most 8 MiB in fp32, whatever the tensor size;
    a tensor of fewer elements is one chunk, which must be reduced in one piece).

    Args:
        t: interpolation factor.
        numel: elements in the whole tensor.
        dtype: compute dtype (float64 computes in float64, anything else in float32).
        device: compute device.
    """

    def __init__(self, t: float, numel: int, dtype: torch.dtype, device: torch.device | str):
        self._numel = numel
        self._dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self._t = torch.tensor(t, dtype=self._dtype, device=device)
        self._phase = "norms" if numel else "ready"
        self._carry: tuple[Tensor, Tensor] | None = None  # buffers of the unfinished chunk
        self._fill = 0  # elements in them
        self._parts: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._norms: tuple[Tensor, Tensor] | None = None
        self.coef_a: Tensor = 1 - self._t
        self.coef_b: Tensor = self._t

    def needs_pass(self) -> bool:
        """Whether another pass over all row blocks (in order) is needed."""
        return self._phase != "ready"

    def observe(self, tensors: Sequence[Tensor], base: Tensor, ctx: TensorContext | None = None) -> None:
        """Feed one row block of the inputs (compute dtype) during a pass (``ctx`` unused)."""
        assert self.needs_pass() and len(tensors) == 1, "slerp takes exactly one non-base model"
        self._feed(base.reshape(-1), tensors[0].reshape(-1), last=False)

    def _feed(self, a: Tensor, b: Tensor, *, last: bool) -> None:
        """Reduce the whole chunks of a block; buffer its unfinished tail (reduced now if ``last``)."""
        pos = 0
        if self._fill:  # complete the chunk the previous blocks left unfinished
            assert self._carry is not None
            pos = min(_CHUNK_NUMEL - self._fill, a.numel())
            for buf, x in zip(self._carry, (a, b), strict=True):
                buf[self._fill : self._fill + pos] = x[:pos]
            self._fill += pos
            if self._fill < _CHUNK_NUMEL:
                return
            self._reduce(*self._carry)
            self._fill = 0
        full = pos + (a.numel() - pos) // _CHUNK_NUMEL * _CHUNK_NUMEL
        for s in range(pos, full, _CHUNK_NUMEL):
            self._reduce(a[s : s + _CHUNK_NUMEL], b[s : s + _CHUNK_NUMEL])
        if full == a.numel():
            return
        if last:  # a whole tensor given as one block: its last chunk needs no copy
            self._reduce(a[full:], b[full:])
            return
        if self._carry is None:
            size = min(_CHUNK_NUMEL, self._numel)
            self._carry = (a.new_empty(size), b.new_empty(size))
        self._fill = a.numel() - full
        for buf, x in zip(self._carry, (a, b), strict=True):
            buf[: self._fill] = x[full:]

    def _reduce(self, a: Tensor, b: Tensor) -> None:
        """One whole chunk's contribution to this pass."""
        a, b = a.to(self._dtype), b.to(self._dtype)
        with ops.one_thread():  # the same bits for any thread count
            if self._norms is None:
                self._parts[0].append(torch.linalg.vector_norm(a))
                self._parts[1].append(torch.linalg.vector_norm(b))
            else:  # normalize before multiplying so the dot product cannot overflow
                norm_a, norm_b = self._norms
                self._parts[0].append(((a / norm_a) * (b / norm_b)).sum())

    def end_pass(self) -> None:
        """Close a pass: reduce the last (partial) chunk, then the chunk results."""
        if self._fill:  # the last, partial chunk
            assert self._carry is not None
            self._reduce(self._carry[0][: self._fill], self._carry[1][: self._fill])
            self._fill = 0
        with ops.one_thread():
            if self._norms is None:
                # norm of chunk norms: the whole-tensor L2 norm without a full float32 copy
                norms = [torch.linalg.vector_norm(torch.stack(parts)) for parts in self._parts]
                self._norms = (
                    torch.where(norms[0] > _NORM_EPS, norms[0], 1), torch.where(norms[1] > _NORM_EPS, norms[1], 1)
                )
            else:
                self.coef_a, self.coef_b = _coefficients(torch.stack(self._parts[0]).sum(), self._t)
                self._phase = "ready"
                self._carry = None
        self._parts = ([], [])

    def run(self, tensors: Sequence[Tensor], base: Tensor) -> SlerpState:
        """Both passes over a whole tensor given as one block."""
        assert len(tensors) == 1, "slerp takes exactly one non-base model"
        while self.needs_pass():
            self._feed(base.reshape(-1), tensors[0].reshape(-1), last=True)
            self.end_pass()
        return self

    def interpolate(self, a: Tensor, b: Tensor) -> Tensor:
        """``coef_a * a + coef_b * b`` of a block (elementwise), in ``a``'s dtype."""
        assert not self.needs_pass()
        flat_a, flat_b = a.reshape(-1), b.reshape(-1)
        out = torch.empty_like(flat_a)
        for s in range(0, flat_a.numel(), _CHUNK_NUMEL):
            part_a = flat_a[s : s + _CHUNK_NUMEL].to(self._dtype)
            part_b = flat_b[s : s + _CHUNK_NUMEL].to(self._dtype)
            out[s : s + _CHUNK_NUMEL] = self.coef_a * part_a + self.coef_b * part_b
        return out.view(a.shape)


def slerp_state(p: SlerpParams, numel: int, dtype: torch.dtype, device: torch.device | str) -> SlerpState:
    """The whole-tensor angle ``slerp`` needs, for a chunked run."""
    return SlerpState(p.t, numel, dtype, device)


def slerp(
    tensors: Sequence[Tensor], base: Tensor, p: SlerpParams, *, ctx: TensorContext, state: SlerpState | None = None
) -> Tensor:
    """SLERP (Shoemake 1985; mergekit's method, https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#slerp-slerp).

    With ``a = base``, ``b = tensors[0]`` flattened, ``a_hat = a / ||a||`` and ``b_hat = b / ||b||``
    (a norm <= 1e-8 is left at 1), ``cos = clamp(a_hat . b_hat, -1, 1)``, ``theta = acos(cos)``:
    ``result = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b``, or the lerp
    ``(1 - t) a + t b`` when ``|cos| > 0.9995``. Note the unnormalized vectors are interpolated.
    Computed in float32 (float64 for float64 inputs); norms and dot over 2**20-element chunks.

    Args:
        tensors: exactly one non-base input.
        base: the base model's tensor (the ``t = 0`` end).
        p: resolved parameters.
        ctx: tensor identity (unused).
        state: the angle gathered over the whole tensor when the inputs are a block of rows
            (blocks then come in order); None computes it from the tensors given.

    Returns:
        The interpolated tensor, in ``base``'s dtype.
    """
    assert len(tensors) == 1, "slerp takes exactly one non-base model"
    if base.numel() == 0:
        return base.clone()
    if state is None:  # the whole tensor is here: its angle comes from it
        state = slerp_state(p, base.numel(), base.dtype, base.device).run(tensors, base)
    return state.interpolate(base, tensors[0])
