"""The contract every merge method follows.

A method is a pure function ``fn(tensors, base, params, *, ctx) -> Tensor``:

- ``tensors``: the non-base inputs of one output tensor, in config order, already cast
  to the compute dtype and on the compute device; shapes were validated by the planner.
- ``base``: the base model's tensor (same dtype/device), or ``None`` for methods that
  take no base (``linear``).
- ``params``: the method's frozen parameter dataclass, resolved for this tensor (name
  filters and layer gradients already evaluated: plain numbers only, each inside the
  :class:`Interval` its field declares and meeting the class's ``CONSTRAINTS``).
- ``ctx``: which tensor this is and the seed; random methods draw from
  :func:`sar_dist.merge.ops.keyed_uniform`, so results never depend on scheduling.

The function does no I/O, logging or device moves, and returns a tensor of the input
shape in the compute dtype (the executor casts to the output dtype).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
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


@dataclass(frozen=True, slots=True)
class Interval:
    """The valid values of a numeric parameter: finite reals between ``lo`` and ``hi``.

    Each end is closed (the end value is valid) unless ``lo_open``/``hi_open``; an infinite end is
    always open. Non-finite numbers (nan, inf) and bools are never inside. Declared beside each
    numeric field (``per_model(..., valid=...)``), checked when the config is parsed.

    Attributes:
        lo: lower end (``-inf``: unbounded).
        hi: upper end (``inf``: unbounded).
        lo_open: whether ``lo`` itself is excluded.
        hi_open: whether ``hi`` itself is excluded.
    """

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __post_init__(self) -> None:
        if math.isnan(self.lo) or math.isnan(self.hi) or self.lo > self.hi:
            raise ValueError(f"empty interval {self.lo}..{self.hi}")

    def __contains__(self, x: object) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            return False
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below

    def __str__(self) -> str:
        left = "(" if self.lo_open or self.lo == -math.inf else "["
        right = ")" if self.hi_open or self.hi == math.inf else "]"
        return f"{left}{self.lo:g}, {self.hi:g}{right}"

    def describe(self) -> str:
        """What a value must be, as an error message says it (``must be ...``)."""
        if self.lo == -math.inf and self.hi == math.inf:
            return "a finite number"
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo == -math.inf:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {self}"


ANY_REAL = Interval()
"""Every finite number (e.g. task-arithmetic weights: negative ones subtract a task vector)."""
NON_NEGATIVE = Interval(0.0)
"""``[0, inf)``."""
POSITIVE = Interval(0.0, lo_open=True)
"""``(0, inf)``."""
UNIT = Interval(0.0, 1.0)
"""``[0, 1]``: fractions and interpolation factors."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Constraint:
    """A condition tying parameters together, declared beside the params class that needs it.

    Every number in ``margins(values)`` must be > 0 wherever ``applies(values)``. ``values`` maps
    yaml keys to plain values: with ``per_model``, one model's value of each per-model key (the check
    runs once per model); without, a tuple over all models. Method-wide keys map to their value.

    For the parse-time check of layer gradients (piecewise linear in the layer position) to be
    exact from the anchors and the midpoints between them, each margin must be affine in the
    numeric values and ``applies`` constant on each open segment between anchors (true of a bool,
    and of a test that a parameter lies strictly inside its own closed interval).

    Attributes:
        keys: the yaml keys involved.
        text: the requirement as an error message states it.
        why: the reason, for the message.
        per_model: whether it holds for each model on its own.
        applies: where the requirement holds.
        margins: the numbers that must be > 0.
    """

    keys: tuple[str, ...]
    text: str
    why: str
    per_model: bool
    applies: Callable[[Mapping[str, Any]], bool]
    margins: Callable[[Mapping[str, Any]], Sequence[float]]


def per_model(yaml_name: str, default: Any = REQUIRED, *, valid: Interval | None = None, why: str = "") -> Any:
    """Declare a per-model parameter field (one value per non-base model, in order).

    The field holds a ``tuple[float, ...]``. ``yaml_name`` is the key users write under a
    model's ``parameters`` (or top-level ``parameters`` for all models), e.g. ``weight``.

    Args:
        yaml_name: the config key.
        default: value used when neither the model nor the top level sets it;
            ``REQUIRED`` makes a missing value a config error.
        valid: the valid values of a numeric parameter (every numeric field declares one).
        why: why those are the valid values, for error messages.

    Returns:
        A ``dataclasses.field`` carrying the metadata the resolver reads.
    """
    return dataclasses.field(
        default=(),
        metadata={"yaml": yaml_name, "per_model": True, "default": default, "valid": valid, "why": why},
    )


def method_param(yaml_name: str, default: Any = REQUIRED, *, valid: Interval | None = None, why: str = "") -> Any:
    """Declare a method-wide parameter (top-level ``parameters`` only), e.g. ``lambda``.

    Args:
        yaml_name: the config key.
        default: the method's default; ``REQUIRED`` makes a missing value a config error.
        valid: the valid values of a numeric parameter (every numeric field declares one).
        why: why those are the valid values, for error messages.

    Returns:
        A ``dataclasses.field`` carrying the metadata the resolver reads.
    """
    field_default = None if default is REQUIRED else default
    return dataclasses.field(
        default=field_default,
        metadata={"yaml": yaml_name, "per_model": False, "default": default, "valid": valid, "why": why},
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
        merges_base: for a method without a base (``needs_base=False``), whether a
            ``base_model`` that is not listed under ``models`` is merged as one more input
            (mergekit's ``linear``); when False it only supplies ``config.json`` and
            ``tokenizer_source: base``.
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
        update: for a method with a ``state`` that is gathered from an elementwise update alone
            (``sar``'s arbitrated update), ``update(tensors, base, params, fisher)`` computes it
            and ``finish(update, base, params, state)`` gives the merged block, where ``fn`` is
            ``finish(update(...), ...)`` and ``state.observe_update(u)`` takes the update's row blocks:
            the executor then computes each block's update once and runs every pass over it.
        finish: see ``update``.
        kernel: for an elementwise method, optionally ``kernel(params, num_inputs, compute_dtype,
            device)`` returning a fused block function, or None where it does not apply:
            ``f(blocks, ctx)`` takes one flat block of every source in the compute dtype (base first,
            then the inputs) and returns the merged block, bit-identical to ``fn`` on it.
    """

    name: str
    fn: MergeFn
    params_cls: type
    needs_base: bool
    paper_url: str
    needs_fisher: bool = False
    merges_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    elementwise: Callable[[Any], bool] = lambda params: False
    state: Callable[..., Any] | None = None
    update: Callable[..., Tensor] | None = None
    finish: Callable[..., Tensor] | None = None
    kernel: Callable[..., Callable[..., Tensor] | None] | None = None

    def param_fields(self) -> Sequence[dataclasses.Field]:
        """The parameter fields, with their ``yaml``/``per_model``/``default``/``valid``/``why`` metadata."""
        return dataclasses.fields(self.params_cls)

    def constraints(self) -> tuple[Constraint, ...]:
        """The conditions across parameters (the params class's ``CONSTRAINTS``)."""
        return tuple(getattr(self.params_cls, "CONSTRAINTS", ()))
