"""Resolve a method's parameters for one tensor: plain numbers out of YAML settings.

mergekit semantics (METHODS.md "Config details"): a value is a scalar; a list of numbers
is a gradient interpolated over the layer position ``t = layer / (num_layers - 1)``
(tensors outside the layer stack use ``t = 0``); a list of ``{filter, value}`` picks the
first entry whose filter is a substring of the tensor name (no filter = default), and
its value may itself be a gradient. Precedence: model's > top-level > method default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from sar_dist.merge.base import REQUIRED, MergeMethod

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_UNSET = object()


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (``model.layers.7.mlp...`` -> 7), or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_position(name: str, num_layers: int) -> float:
    """mergekit's gradient position t in [0, 1] for a tensor name."""
    idx = layer_index(name)
    if idx is None or num_layers <= 1:
        return 0.0
    return min(idx / (num_layers - 1), 1.0)


def _interp(values: Sequence[float], t: float) -> float:
    """Piecewise-linear interpolation of values spread evenly over [0, 1] (as np.interp)."""
    if len(values) == 1:
        return float(values[0])
    x = t * (len(values) - 1)
    i = min(int(x), len(values) - 2)
    frac = x - i
    return float(values[i] + (values[i + 1] - values[i]) * frac)


def evaluate(value: Any, name: str, t: float) -> Any:
    """Evaluate a raw setting for tensor ``name`` at layer position ``t``.

    Returns:
        The plain value, or ``_UNSET`` when a filter list has no matching entry.
    """
    if isinstance(value, list):
        if value and all(isinstance(v, Mapping) for v in value):
            for entry in value:
                flt = entry.get("filter")
                if flt is None or flt in name:
                    return evaluate(entry["value"], name, t)
            return _UNSET
        return _interp(value, t)
    return value


def _coerce(value: Any, default: Any, where: str) -> Any:
    if default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(value, bool) and isinstance(value, int):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return float(value)


def resolve(
    method: MergeMethod,
    name: str,
    t: float,
    top: Mapping[str, Any],
    per_model: Sequence[Mapping[str, Any]],
    where: str = "parameters",
) -> Any:
    """Build the method's params dataclass for one tensor.

    Args:
        method: the method (its params class declares fields and defaults).
        name: tensor name (for filters).
        t: layer position (for gradients).
        top: top-level ``parameters``.
        per_model: each non-base model's ``parameters``, in input order.
        where: prefix for messages.

    Returns:
        An instance of ``method.params_cls``.

    Raises:
        ValueError: a required value is missing or has the wrong type.
    """
    kwargs: dict[str, Any] = {}
    for f in method.param_fields():
        key, default = f.metadata["yaml"], f.metadata["default"]
        top_value = evaluate(top[key], name, t) if key in top else _UNSET
        if f.metadata["per_model"]:
            values = []
            for i, mp in enumerate(per_model):
                v = evaluate(mp[key], name, t) if key in mp else _UNSET
                v = top_value if v is _UNSET else v
                v = default if v is _UNSET else v
                if v is REQUIRED:
                    raise ValueError(f"{where}: model {i} needs parameter '{key}' for '{method.name}' (tensor {name})")
                values.append(_coerce(v, 1.0 if default is REQUIRED else default, f"{where}: {key} (model {i}, tensor {name})"))
            kwargs[f.name] = tuple(values)
        else:
            v = default if top_value is _UNSET else top_value
            if v is REQUIRED:
                raise ValueError(f"{where}: '{method.name}' needs parameter '{key}' (tensor {name})")
            kwargs[f.name] = _coerce(v, 1.0 if default is REQUIRED else default, f"{where}: {key} (tensor {name})")
    return method.params_cls(**kwargs)
