"""Resolve a method's parameters for one tensor: plain numbers out of YAML settings.

mergekit semantics (docs/methods.md, "Parameter resolution"): a value is a scalar; a list of numbers
is a gradient interpolated over the layer position ``t = layer / (num_layers - 1)``
(tensors outside the layer stack use ``t = 0``); a list of ``{filter, value}`` picks the
first entry whose filter is a substring of the tensor name (no filter = default), and
its value may itself be a gradient. Precedence: model's > top-level > method default.

:func:`check_parameters` validates, when the config is parsed, every value a setting can take
against the :class:`~sar_dist.merge.base.Interval` its field declares (every gradient anchor: the
interpolation between anchors inside an interval stays inside) and the params class's
``CONSTRAINTS`` (exactly for gradients, conservatively for name filters: every combination of
filters a tensor name could contain); :func:`resolve` checks the plain values of each tensor again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from sar_dist.merge.base import REQUIRED, Constraint, MergeMethod

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
        ValueError: a required value is missing, has the wrong type or is outside its field's
            interval, or the values break one of the method's constraints.
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
    _check_resolved(method, kwargs, name, where)
    return method.params_cls(**kwargs)


def _check_resolved(method: MergeMethod, kwargs: Mapping[str, Any], name: str, where: str) -> None:
    """The plain values of one tensor inside their intervals and meeting the constraints (a second
    guard behind :func:`check_parameters`, for callers that build jobs without parsing a config)."""
    values: dict[str, Any] = {}
    for f in method.param_fields():
        key, v = f.metadata["yaml"], kwargs[f.name]
        values[key] = v
        valid = f.metadata.get("valid")
        if valid is None:
            continue
        for i, x in enumerate(v if f.metadata["per_model"] else (v,)):
            if x not in valid:
                who = f" (model {i}, tensor {name})" if f.metadata["per_model"] else f" (tensor {name})"
                raise ValueError(f"{where}: {key} = {_show(x)}{who}: {_must_be(f)}")
    for c in method.constraints():
        for i, point in _constraint_points(method, c, values):
            if c.applies(point) and min(c.margins(point)) <= 0:
                who = f"model {i}, " if i is not None else ""
                raise ValueError(f"{where}: {_show_point(method, c, point)} ({who}tensor {name}): {c.text} ({c.why})")


# ---------------------------------------------------------------------------------------------
# parse-time validation


_MAX_FILTERS = 10  # more distinct filters than this in one constraint's settings: checked per tensor


def check_parameters(
    method: MergeMethod,
    top: Mapping[str, Any],
    inputs: Sequence[tuple[str, Mapping[str, Any]]],
    where: str,
    others: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> None:
    """Validate every value the parameters can take, before any work (names and shapes were checked).

    Each number of a scalar, of every anchor of a gradient and of every filter entry (recursively)
    must be finite and inside its field's interval; bools and strings are not numbers, and bool or
    string fields take only bools or strings. The method's constraints must hold for every
    combination of values a tensor can get (see the module docstring).

    Args:
        method: the method.
        top: top-level ``parameters``.
        inputs: ``(label, parameters)`` of each model the method combines, in order; the label
            names it in messages, e.g. ``models[1] (s3://bucket/rl-code)``.
        where: the file, prefix of every message.
        others: ``(label, parameters)`` of listed models the method does not combine (a base
            listed under ``models``): their values are range-checked too.

    Raises:
        ValueError: one line naming the key, the model (URL) and the valid values.
    """
    fields = {f.metadata["yaml"]: f for f in method.param_fields()}
    for label, params in [*inputs, *others]:
        for key, value in params.items():
            if key in fields:
                _check_leaves(fields[key], value, f"{where}: {label} parameters.{key}", "")
    for key, value in top.items():
        f = fields.get(key)
        if f is None:
            continue
        users = ""
        if f.metadata["per_model"]:
            labels = [label for label, params in inputs if key not in params or _may_be_unset(params[key])]
            if labels:
                users = f" (for {labels[0]}{f' and {len(labels) - 1} more' if len(labels) > 1 else ''})"
        _check_leaves(f, value, f"{where}: parameters.{key}", users)
    for c in method.constraints():
        _check_constraint(method, c, top, inputs, where)


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if not math.isfinite(v) or v == float(f"{v:.6g}") else f"{v:.6g}"
    return repr(v)


def _must_be(f: Any) -> str:
    why = f.metadata.get("why")
    return f"must be {f.metadata['valid'].describe()}" + (f" ({why})" if why else "")


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every plain value of a setting with its path: the scalar, each gradient anchor, each filter value."""
    if isinstance(value, list):
        if value and all(isinstance(v, Mapping) for v in value):
            for j, entry in enumerate(value):
                yield from _leaves(entry["value"], f"{path}[{j}].value")
        else:
            for j, v in enumerate(value):
                yield f"{path}[{j}]", v
        return
    yield path, value


def _check_leaves(f: Any, value: Any, prefix: str, users: str) -> None:
    valid, default = f.metadata.get("valid"), f.metadata["default"]
    for path, v in _leaves(value):
        if valid is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                problem = f"expected a number, not {'true/false' if isinstance(v, bool) else type(v).__name__}"
            elif v in valid:
                continue
            elif not math.isfinite(v):
                problem = "must be a finite number"
            else:
                problem = _must_be(f)
        elif isinstance(default, bool):
            if isinstance(v, bool):
                continue
            problem = "expected true or false"
        elif isinstance(default, str):
            if isinstance(v, str):
                continue
            problem = "expected a string"
        else:
            continue
        raise ValueError(f"{prefix}{path} = {_show(v)}{users}: {problem}")


def _is_filter_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _may_be_unset(value: Any) -> bool:
    """Whether a model's setting leaves some tensor to the top level (a filter list without a default)."""
    if not _is_filter_list(value):
        return False
    for entry in value:
        if _may_be_unset(entry["value"]):
            return True
        if not entry.get("filter"):
            return False
    return True


def _filters(value: Any, out: set[str]) -> None:
    if _is_filter_list(value):
        for entry in value:
            if entry.get("filter"):
                out.add(entry["filter"])
            _filters(entry["value"], out)


def _pick(value: Any, present: frozenset[str]) -> Any:
    """What :func:`evaluate` picks for a tensor whose name contains exactly the filters ``present``:
    a scalar, a gradient (list of numbers) or ``_UNSET``."""
    if _is_filter_list(value):
        for entry in value:
            flt = entry.get("filter")
            if not flt or flt in present:
                return _pick(entry["value"], present)
        return _UNSET
    return value


def _scenarios(filters: Sequence[str]) -> Iterator[frozenset[str]]:
    """Every set of filters a tensor name can contain (with a filter, each filter inside it)."""
    for mask in range(2 ** len(filters)):
        present = frozenset(f for j, f in enumerate(filters) if mask >> j & 1)
        if all(g in present for f in present for g in filters if g in f):
            yield present


def _at(piece: Any, t: float) -> Any:
    if isinstance(piece, list):
        return _interp(piece, t)
    return float(piece) if isinstance(piece, (int, float)) and not isinstance(piece, bool) else piece


def _constraint_points(
    method: MergeMethod, c: Constraint, values: Mapping[str, Any]
) -> Iterator[tuple[int | None, dict[str, Any]]]:
    """The points a constraint is evaluated at: per model (index, one model's values) or once (None, all)."""
    per_model = {f.metadata["yaml"] for f in method.param_fields() if f.metadata["per_model"]}
    if not c.per_model:
        yield None, {k: values[k] for k in c.keys}
        return
    num_models = max((len(values[k]) for k in c.keys if k in per_model), default=0)
    for i in range(num_models):
        yield i, {k: values[k][i] if k in per_model else values[k] for k in c.keys}


def _show_point(method: MergeMethod, c: Constraint, point: Mapping[str, Any]) -> str:
    parts = []
    for k in c.keys:
        v = point[k]
        parts.append(f"{k} = {', '.join(_show(x) for x in v) if isinstance(v, tuple) else _show(v)}")
    return "parameters " + ", ".join(parts)


def _check_constraint(
    method: MergeMethod,
    c: Constraint,
    top: Mapping[str, Any],
    inputs: Sequence[tuple[str, Mapping[str, Any]]],
    where: str,
) -> None:
    fields = {f.metadata["yaml"]: f for f in method.param_fields()}
    settings = [top.get(k) for k in c.keys]
    settings += [params.get(k) for _, params in inputs for k in c.keys if fields[k].metadata["per_model"]]
    found: set[str] = set()
    for s in settings:
        _filters(s, found)
    if len(found) > _MAX_FILTERS:
        return  # too many combinations: resolve() checks each tensor's values
    filters = sorted(found)
    for present in _scenarios(filters):
        pieces: dict[str, Any] = {}
        for k in c.keys:
            f = fields[k]
            default = f.metadata["default"]
            top_piece = _pick(top[k], present) if k in top else _UNSET
            top_piece = default if top_piece is _UNSET else top_piece
            if f.metadata["per_model"]:
                pieces[k] = [_pick(p[k], present) if k in p else _UNSET for _, p in inputs]
                pieces[k] = [top_piece if p is _UNSET else p for p in pieces[k]]
            else:
                pieces[k] = top_piece
        flat = [p for k, v in pieces.items() for p in (v if fields[k].metadata["per_model"] else [v])]
        if any(p is REQUIRED for p in flat):
            continue  # a missing value: resolve() names it
        grads = [p for p in flat if isinstance(p, list)]
        ts = sorted({0.0, 1.0} | {j / (len(g) - 1) for g in grads if len(g) > 1 for j in range(len(g))})

        def at(t: float, pieces: dict[str, Any] = pieces) -> dict[str, Any]:
            return {k: tuple(_at(p, t) for p in v) if fields[k].metadata["per_model"] else _at(v, t)
                    for k, v in pieces.items()}

        for i, point, t, beside in _violations(method, c, at, ts):
            who = f"{inputs[i][0]} " if i is not None else f"{', '.join(label for label, _ in inputs)}: "
            context = []
            if filters:
                context.append(f"for tensors whose names contain {' and '.join(repr(f) for f in sorted(present))}"
                               if present else "for tensors matching none of the filters")
            if grads:
                context.append(f"{'just beside' if beside else 'at'} layer position t = {t:.4g}")
            ctx = f" ({', '.join(context)})" if context else ""
            raise ValueError(f"{where}: {who}{_show_point(method, c, point)}{ctx}: {c.text} ({c.why})")


def _violations(
    method: MergeMethod, c: Constraint, at: Callable[[float], dict[str, Any]], ts: Sequence[float]
) -> Iterator[tuple[int | None, dict[str, Any], float, bool]]:
    """Where ``c`` fails over ``t`` in [0, 1], values piecewise linear between the points ``ts``:
    yields (model index or None, values, t, whether it fails just beside t rather than at it)."""
    for t in ts:
        for i, point in _constraint_points(method, c, at(t)):
            if c.applies(point) and min(c.margins(point)) <= 0:
                yield i, point, t, False
    for a, b in zip(ts, ts[1:], strict=False):
        ends = {e: list(_constraint_points(method, c, at(e))) for e in (a, b)}
        for n, (i, point) in enumerate(_constraint_points(method, c, at((a + b) / 2))):
            if not c.applies(point):
                continue
            if min(c.margins(point)) <= 0:
                yield i, point, (a + b) / 2, False
            for e, end in ends.items():
                # margins are affine: > 0 on the open segment needs >= 0 at both ends
                if min(c.margins(end[n][1])) < 0:
                    yield i, end[n][1], e, True
