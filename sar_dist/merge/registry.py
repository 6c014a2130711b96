"""Name -> merge method: the single list of methods (one explicit line each, no decorators).

Variants of one formula (``dare_ties``, ``della``, ...) are presets of one function, as in mergekit.
At import every parameter class is checked to be a frozen, ``kw_only``, ``slots`` dataclass whose
fields carry the ``yaml``/``per_model``/``default`` metadata the resolver reads, every numeric field
declaring its valid values (an :class:`~sar_dist.merge.base.Interval` holding its default).
"""

from __future__ import annotations

import dataclasses
import re

from sar_dist.merge.base import REQUIRED, Interval, MergeMethod
from sar_dist.merge.methods.linear import LINEAR_URL, LinearParams, linear
from sar_dist.merge.methods.ram import RAM_URL, RamParams, RamplusTlParams, ram, ramplus_tl, ramplus_tl_state
from sar_dist.merge.methods.sar import (
    FISHER_URL,
    SAR_URL,
    FisherParams,
    SarParams,
    fisher,
    sar,
    sar_elementwise,
    sar_finish,
    sar_state,
    sar_update,
)
from sar_dist.merge.methods.slerp import SLERP_URL, SlerpParams, slerp, slerp_state
from sar_dist.merge.methods.task_arithmetic import (
    TASK_ARITHMETIC_URL,
    TIES_URL,
    TaskArithmeticParams,
    TiesParams,
    task_arithmetic,
    task_arithmetic_kernel,
    ties,
    ties_state,
)
from sar_dist.merge.methods.task_arithmetic_presets import (
    BREADCRUMBS_URL,
    DARE_URL,
    DELLA_URL,
    BreadcrumbsParams,
    BreadcrumbsTiesParams,
    DareLinearParams,
    DareTiesParams,
    DellaLinearParams,
    DellaParams,
    breadcrumbs,
    breadcrumbs_state,
    breadcrumbs_ties,
    dare_linear,
    dare_state,
    dare_ties,
    della,
    della_linear,
    della_state,
)


# Which tensors may be merged in row blocks: the method is elementwise for these params
# (no whole-tensor statistic: no magnitude threshold, no norm for a rescale, no ranks).
def _always(p: object) -> bool:
    return True


def _no_trim(p: TaskArithmeticParams) -> bool:  # the ties, breadcrumbs and della sparsifiers: no-ops at density >= 1
    return all(d >= 1 for d in p.densities)


def _no_rescale(p: DareLinearParams) -> bool:  # DARE drops are elementwise; its L1 rescale is not
    return not p.rescale or all(d >= 1 for d in p.densities)


_ALL = [
    MergeMethod(name="linear", fn=linear, params_cls=LinearParams, needs_base=False, paper_url=LINEAR_URL, elementwise=_always),
    MergeMethod(name="slerp", fn=slerp, params_cls=SlerpParams, needs_base=True, paper_url=SLERP_URL, max_models=1, state=slerp_state),
    MergeMethod(name="task_arithmetic", fn=task_arithmetic, params_cls=TaskArithmeticParams, needs_base=True, paper_url=TASK_ARITHMETIC_URL, elementwise=_always, kernel=task_arithmetic_kernel),
    MergeMethod(name="ties", fn=ties, params_cls=TiesParams, needs_base=True, paper_url=TIES_URL, elementwise=_no_trim, state=ties_state),
    MergeMethod(name="dare_linear", fn=dare_linear, params_cls=DareLinearParams, needs_base=True, paper_url=DARE_URL, elementwise=_no_rescale, state=dare_state),
    MergeMethod(name="dare_ties", fn=dare_ties, params_cls=DareTiesParams, needs_base=True, paper_url=DARE_URL, elementwise=_no_rescale, state=dare_state),
    MergeMethod(name="breadcrumbs", fn=breadcrumbs, params_cls=BreadcrumbsParams, needs_base=True, paper_url=BREADCRUMBS_URL, elementwise=_no_trim, state=breadcrumbs_state),
    MergeMethod(name="breadcrumbs_ties", fn=breadcrumbs_ties, params_cls=BreadcrumbsTiesParams, needs_base=True, paper_url=BREADCRUMBS_URL, elementwise=_no_trim, state=breadcrumbs_state),
    # DELLA's ranks are per row, but not `elementwise` even without rescale: the planner cuts the
    # 1-D tensors of elementwise methods too, and a 1-D tensor is one row
    MergeMethod(name="della", fn=della, params_cls=DellaParams, needs_base=True, paper_url=DELLA_URL, elementwise=_no_trim, state=della_state),
    MergeMethod(name="della_linear", fn=della_linear, params_cls=DellaLinearParams, needs_base=True, paper_url=DELLA_URL, elementwise=_no_trim, state=della_state),
    MergeMethod(name="ram", fn=ram, params_cls=RamParams, needs_base=True, paper_url=RAM_URL, elementwise=_always),
    MergeMethod(name="ramplus_tl", fn=ramplus_tl, params_cls=RamplusTlParams, needs_base=True, paper_url=RAM_URL, state=ramplus_tl_state),
    MergeMethod(name="sar", fn=sar, params_cls=SarParams, needs_base=True, paper_url=SAR_URL, needs_fisher=True, elementwise=sar_elementwise, state=sar_state, update=sar_update, finish=sar_finish),
    MergeMethod(name="fisher", fn=fisher, params_cls=FisherParams, needs_base=False, paper_url=FISHER_URL, needs_fisher=True, merges_base=False, elementwise=_always),
]  # fmt: skip

METHODS: dict[str, MergeMethod] = {m.name: m for m in _ALL}
"""Every merge method, by its ``merge_method`` name."""


def get_method(name: str) -> MergeMethod:
    """Look up a merge method by its config name.

    Args:
        name: the ``merge_method`` value.

    Returns:
        The registered method.

    Raises:
        ValueError: if no method has that name; the message lists the known names.
    """
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown merge_method {name!r}; known: {known}") from None


_NUMERIC = re.compile(r"\b(float|int)\b")


def is_numeric_field(f: dataclasses.Field) -> bool:
    """Whether a parameter field holds numbers (``float``, ``tuple[float, ...]``), not bools or strings."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return bool(_NUMERIC.search(str(kind)))


def check_params_cls(cls: type) -> None:
    """Check that a parameter class follows the contract.

    Args:
        cls: the class to check.

    Raises:
        TypeError: unless ``cls`` is a frozen, ``kw_only``, ``slots`` dataclass whose fields all carry
            ``yaml``/``per_model``/``default`` metadata, whose numeric fields (and only those) declare
            ``valid`` values holding their default, and whose ``CONSTRAINTS`` name its keys.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} is not frozen")
    if "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} does not use slots")
    for f in dataclasses.fields(cls):
        if not f.kw_only:
            raise TypeError(f"{cls.__name__}.{f.name} is not kw_only")
        if not {"yaml", "per_model", "default"} <= set(f.metadata):
            raise TypeError(f"{cls.__name__}.{f.name} was not declared with per_model() or method_param()")
        valid, default = f.metadata.get("valid"), f.metadata["default"]
        if is_numeric_field(f):
            if not isinstance(valid, Interval):
                raise TypeError(f"{cls.__name__}.{f.name} is numeric but declares no valid=Interval(...)")
            if default is not REQUIRED and default not in valid:
                raise TypeError(f"{cls.__name__}.{f.name}: default {default!r} is not in {valid}")
        elif valid is not None:
            raise TypeError(f"{cls.__name__}.{f.name} is not numeric but declares valid={valid}")
    keys = {f.metadata["yaml"] for f in dataclasses.fields(cls)}
    for c in getattr(cls, "CONSTRAINTS", ()):
        if not set(c.keys) <= keys:
            raise TypeError(f"{cls.__name__}: a constraint names unknown keys {sorted(set(c.keys) - keys)}")


assert len(METHODS) == len(_ALL), "duplicate method name"
for _method in _ALL:
    check_params_cls(_method.params_cls)
