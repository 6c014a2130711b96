"""Checkpoint tensors <-> model parameters, the way transformers itself loads and saves.

transformers 5 holds some weights fused where checkpoints keep them apart: a ``qwen3_moe``
layer has one ``mlp.experts.gate_up_proj`` of shape ``[E, 2I, H]`` while its checkpoint
stores ``mlp.experts.{e}.gate_proj.weight`` and ``...up_proj.weight`` per expert. The
mapping comes from transformers' own conversion machinery: ``revert_weight_conversion``,
which ``save_pretrained`` applies to turn parameters back into checkpoint tensors. It is
applied here to one parameter at a time, holding each element's flat index, so every
checkpoint tensor it produces says which elements of the parameter it is. The conversions
of this kind (stack, split, chunk, concatenate) keep each checkpoint tensor a strided view
of its parameter: ``(storage offset, strides)`` is all a rank needs to fill its slice of
the parameter at load and to cut the statistics back into checkpoint tensors at the end.
Squaring is elementwise, so the statistics of a checkpoint tensor are the same view of its
parameter's statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParamView:
    """A checkpoint tensor as a strided view of a (fused) model parameter.

    Attributes:
        param: the parameter's name.
        shape: the checkpoint tensor's shape.
        offset: flat index of its first element in the parameter.
        strides: element strides into the flattened parameter.
    """

    param: str
    shape: tuple[int, ...]
    offset: int
    strides: tuple[int, ...]


def _affine(index: Any, flat: Any) -> tuple[int, tuple[int, ...]] | None:
    """``(offset, strides)`` such that ``as_strided(flat, shape, strides, offset)`` equals
    ``index``, or None when the conversion is no strided view (a permutation within rows)."""
    import torch

    if index.numel() == 0:
        return None
    offset = int(index.reshape(-1)[0])
    strides = []
    for d, size in enumerate(index.shape):
        if size == 1:
            strides.append(1)
            continue
        at = [0] * index.dim()
        at[d] = 1
        strides.append(int(index[tuple(at)]) - offset)
    if any(s < 0 for s in strides):
        return None
    if not torch.equal(torch.as_strided(flat, tuple(index.shape), tuple(strides), offset), index):
        return None
    return offset, tuple(strides)


def checkpoint_views(model: Any, where: str) -> dict[str, ParamView]:
    """Checkpoint tensor name -> its view of a parameter, for every parameter that
    transformers saves under other names or shapes (none for most dense models).

    Args:
        model: the model class built on the meta device.
        where: names the model in messages.

    Raises:
        ValueError: a conversion that is no strided view of its parameter.
    """
    import torch

    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: checkpoints hold the parameters as they are
        return {}
    views: dict[str, ParamView] = {}
    for name, p in model.named_parameters():
        probe = revert_weight_conversion(model, {name: p})
        if list(probe) == [name] and tuple(probe[name].shape) == tuple(p.shape):
            continue  # saved as it is
        dtype = torch.int32 if p.numel() < 2**31 else torch.int64
        flat = torch.arange(p.numel(), dtype=dtype)
        converted = revert_weight_conversion(model, {name: flat.view(p.shape)})
        covered = 0
        for key, index in converted.items():
            index = index[0] if isinstance(index, list) else index
            affine = _affine(index, flat)
            if affine is None:
                raise ValueError(f"model {where}: transformers saves parameter '{name}' as '{key}' by a conversion "
                                 f"that is not a strided view of it; the Fisher stage cannot shard it")
            views[key] = ParamView(param=name, shape=tuple(index.shape), offset=affine[0], strides=affine[1])
            covered += math.prod(index.shape)
        if covered != p.numel():
            raise ValueError(f"model {where}: transformers saves parameter '{name}' as {len(converted)} tensor(s) "
                             f"of {covered} elements, not its {p.numel()}")
    return views
