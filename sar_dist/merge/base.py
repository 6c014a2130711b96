"""The contract every merge method follows.

A method is a pure function ``fn(tensors, base, params, *, ctx) -> Tensor``:

- ``tensors``: the non-base inputs of one output tensor, in config order, already cast
  to the compute dtype and on the compute device; shapes were validated by the planner.
- ``base``: the base model's tensor (same dtype/device), or ``None`` for methods that
  take no base (``linear``).
- ``params``: the method's frozen parameter dataclass, resolved for this tensor (name
  filters and layer gradients already evaluated: plain numbers only).
- ``ctx``: which tensor this is and the seed; random methods draw from
  :func:`sar_dist.merge.ops.keyed_uniform`, so results never depend on scheduling.

The function does no I/O, logging or device moves, and returns a tensor of the input
shape in the compute dtype (the executor casts to the output dtype).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

REQUIRED: Any = object()
"""Marker for a per-model parameter without a default (e.g. ``linear``'s ``weight``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorContext:
    """Identity of the tensor being merged, for keyed randomness and messages.

    Attributes:
        name: the checkpoint tensor name (e.g. ``model.layers.0.mlp.up_proj.weight``).
        seed: the job's seed.
        offset: flattened index of the first element passed to the method; non-zero when
            an executor hands an elementwise method a block of rows, so keyed random
            streams line up with the whole-tensor run.
    """

    name: str
    seed: int = 0
    offset: int = 0


def per_model(yaml_name: str, default: Any = REQUIRED) -> Any:
    """Declare a per-model parameter field (one value per non-base model, in order).

    The field holds a ``tuple[float, ...]``. ``yaml_name`` is the key users write under a
    model's ``parameters`` (or top-level ``parameters`` for all models), e.g. ``weight``.

    Args:
        yaml_name: the config key.
        default: value used when neither the model nor the top level sets it;
            ``REQUIRED`` makes a missing value a config error.

    Returns:
        A ``dataclasses.field`` carrying the metadata the resolver reads.
    """
    return dataclasses.field(
        default=(), metadata={"yaml": yaml_name, "per_model": True, "default": default}
    )


def method_param(yaml_name: str, default: Any = REQUIRED) -> Any:
    """Declare a method-wide parameter (top-level ``parameters`` only), e.g. ``lambda``.

    Args:
        yaml_name: the config key.
        default: the method's default; ``REQUIRED`` makes a missing value a config error.

    Returns:
        A ``dataclasses.field`` carrying the metadata the resolver reads.
    """
    field_default = None if default is REQUIRED else default
    return dataclasses.field(
        default=field_default,
        metadata={"yaml": yaml_name, "per_model": False, "default": default},
    )


MergeFn = Callable[..., Tensor]


@dataclass(frozen=True, kw_only=True, slots=True)
class MergeMethod:
    """One registered merge method.

    Attributes:
        name: registry key, as written in ``merge_method``.
        fn: the pure per-tensor function.
        params_cls: its frozen ``kw_only``/``slots`` parameter dataclass.
        needs_base: whether ``base_model`` is required.
        needs_fisher: whether every model needs a ``fisher:`` statistics URL.
        paper_url: reference for the formula.
        min_models: fewest non-base models accepted.
        max_models: most non-base models accepted (None: no limit).
        elementwise: given resolved params, whether the method on a block of rows equals
            that block of the method on the whole tensor (no whole-tensor statistic such
            as a top-k threshold or a norm); such tensors may be processed in row chunks.
        state: for methods that need whole-tensor statistics, ``state(params, numel, dtype,
            device)`` makes an object gathering them in passes over the row chunks
            (``needs_pass()``, ``observe(tensors, base, ctx)`` per chunk in order, ``end_pass()``);
            ``fn(..., state=s)`` then merges the chunks in order, exactly as the whole tensor.
            Such tensors may also be processed in row chunks.
    """

    name: str
    fn: MergeFn
    params_cls: type
    needs_base: bool
    paper_url: str
    needs_fisher: bool = False
    min_models: int = 1
    max_models: int | None = None
    elementwise: Callable[[Any], bool] = lambda params: False
    state: Callable[..., Any] | None = None

    def param_fields(self) -> Sequence[dataclasses.Field]:
        """The parameter fields, with their ``yaml``/``per_model``/``default`` metadata."""
        return dataclasses.fields(self.params_cls)
