"""Spherical linear interpolation between the base and one other model, computed in float32."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sar_dist.merge import ops
from sar_dist.merge.base import REQUIRED, TensorContext, method_param

SLERP_URL = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#slerp-slerp"

_CHUNK_NUMEL = 2**20  # bounds the float32 scratch for large low-precision tensors
_NORM_EPS = 1e-8
_DOT_THRESHOLD = 0.9995


@dataclass(frozen=True, kw_only=True, slots=True)
class SlerpParams:
    """Parameters of ``slerp``.

    Attributes:
        t: ``t``, interpolation factor (required): 0 gives the base, 1 the other model.
    """

    t: float = method_param("t", REQUIRED)


def slerp(tensors: Sequence[Tensor], base: Tensor, p: SlerpParams, *, ctx: TensorContext) -> Tensor:
    """SLERP (Shoemake 1985; mergekit's method, https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#slerp-slerp).

    With ``a = base``, ``b = tensors[0]`` flattened, ``a_hat = a / ||a||`` and ``b_hat = b / ||b||``
    (a norm <= 1e-8 is left at 1), ``cos = clamp(a_hat . b_hat, -1, 1)``, ``theta = acos(cos)``:
    ``result = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b``, or the lerp
    ``(1 - t) a + t b`` when ``|cos| > 0.9995``. Note the unnormalized vectors are interpolated.
    Computed in float32 (float64 for float64 inputs) in 2**20-element chunks.

    Args:
        tensors: exactly one non-base input.
        base: the base model's tensor (the ``t = 0`` end).
        p: resolved parameters.
        ctx: tensor identity (unused).

    Returns:
        The interpolated tensor, in ``base``'s dtype.
    """
    assert len(tensors) == 1, "slerp takes exactly one non-base model"
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    a = base.reshape(-1)
    b = tensors[0].reshape(-1)
    t = torch.tensor(p.t, dtype=dtype, device=base.device)
    starts = range(0, a.numel(), _CHUNK_NUMEL)

    def part(v: Tensor, start: int) -> Tensor:
        return v[start : start + _CHUNK_NUMEL].to(dtype)

    if a.numel() == 0:
        return base.clone()
    with ops.one_thread():  # whole-tensor reductions: same bits for any thread count
        # Norm of per-chunk norms: the whole-tensor L2 norm without a full float32 copy.
        norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(part(a, s)) for s in starts]))
        norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(part(b, s)) for s in starts]))
        norm_a = torch.where(norm_a > _NORM_EPS, norm_a, 1)
        norm_b = torch.where(norm_b > _NORM_EPS, norm_b, 1)
        # Normalize before multiplying so the dot product cannot overflow.
        dot = torch.stack([((part(a, s) / norm_a) * (part(b, s) / norm_b)).sum() for s in starts]).sum()
    dot = dot.clamp(-1, 1)
    if dot.abs() > _DOT_THRESHOLD:  # nearly collinear: sin(theta) ~ 0, use lerp
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t) * theta) / sin_theta
        coef_b = torch.sin(t * theta) / sin_theta
    out = torch.empty_like(a)
    for s in starts:
        out[s : s + _CHUNK_NUMEL] = coef_a * part(a, s) + coef_b * part(b, s)
    return out.view(base.shape)
