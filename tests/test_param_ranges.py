"""Every numeric parameter's valid range, checked when the config is parsed (issue 11, item 5).

Each range lives beside its field (``valid=Interval(...)``); ``MergeJob.from_dict`` refuses a value
outside it, whether a scalar, an anchor of a layer gradient or a filter entry's value, with one line
naming the key and the model, and the CLI exits 2 before anything is read or written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from sar_dist.config import MergeJob
from sar_dist.merge.base import ANY_REAL, Interval, method_param, per_model
from sar_dist.merge.registry import METHODS, check_params_cls, get_method
from sar_dist.plan.params import resolve
from tests.conftest import run_cli, write_config

A, B = "s3://bucket/rl-math", "s3://bucket/rl-code"
BASE = "s3://bucket/base"

# (method, key) -> the range it must have: the spec this file holds the declarations to
RANGES = {
    **{(m, k): r for m in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                           "breadcrumbs_ties", "della", "della_linear")
       for k, r in (("weight", "(-inf, inf)"), ("density", "[0, 1]"), ("lambda", "(-inf, inf)"))},
    ("breadcrumbs", "gamma"): "[0, 1]",
    ("breadcrumbs_ties", "gamma"): "[0, 1]",
    ("della", "epsilon"): "[0, 0.5)",
    ("della_linear", "epsilon"): "[0, 0.5)",
    ("linear", "weight"): "(-inf, inf)",
    ("slerp", "t"): "[0, 1]",
    ("ram", "epsilon"): "[0, inf)",
    ("ramplus_tl", "r"): "[0, inf)",
    ("ramplus_tl", "alpha"): "[0, inf)",
    ("ramplus_tl", "epsilon"): "(0, inf)",
    ("sar", "weight"): "(-inf, inf)",
    ("sar", "eps"): "[0, inf)",
    ("sar", "fisher_floor"): "[0, inf)",
    ("sar", "density"): "[0, 1]",
    ("sar", "lambda"): "(-inf, inf)",
    ("fisher", "weight"): "[0, inf)",
    ("fisher", "fisher_floor"): "(0, inf)",
}


def _config(method: str, top: dict | None = None, a: dict | None = None, b: dict | None = None) -> dict:
    """A minimal valid config of ``method`` with two input models (slerp: one), plus the given values."""
    m = get_method(method)
    models = [{"model": A, "parameters": dict(a or {})}]
    if method != "slerp":
        models.append({"model": B, "parameters": dict(b or {})})
    if m.needs_fisher:
        for entry in models:
            entry["fisher"] = entry["model"] + "-fisher"
    base = BASE if m.needs_base else None
    params = {"weight": 1.0} if method in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                                           "breadcrumbs", "breadcrumbs_ties", "della", "della_linear") else {}
    if method == "slerp":
        params["t"] = 0.5
    params.update(top or {})
    d = {"merge_method": method, "models": models, "parameters": params, "output": "/nowhere/out"}
    if base:
        d["base_model"] = base
    return d


def _parse(d: dict) -> MergeJob:
    return MergeJob.from_dict(d, where="cfg.yaml")


def _refused(d: dict) -> str:
    with pytest.raises(ValueError) as e:
        _parse(d)
    msg = str(e.value)
    assert msg.startswith("cfg.yaml: ") and "\n" not in msg
    return msg


def _outside(r: Interval) -> list[float]:
    """Values just outside both ends (an infinite end: inf itself), and nan."""
    low = -math.inf if r.lo == -math.inf else (r.lo if r.lo_open else r.lo - 1e-9 - abs(r.lo) * 1e-9)
    high = math.inf if r.hi == math.inf else (r.hi if r.hi_open else r.hi + 1e-9)
    return [low, high, math.nan]


def _edges(r: Interval) -> list[float]:
    """In-range values at (or just inside) both ends; a large finite value for an unbounded end."""
    low = -1e6 if r.lo == -math.inf else (r.lo + 1e-9 if r.lo_open else r.lo)
    high = 1e6 if r.hi == math.inf else (r.hi - 1e-9 if r.hi_open else r.hi)
    return [low, high]


def _field(method: str, key: str):
    return next(f for f in get_method(method).param_fields() if f.metadata["yaml"] == key)


# the edge values are checked one parameter at a time; these keep the others compatible
_EDGE_CONTEXT = {
    ("linear", "weight"): ({"normalize": False}, {}),  # normalize needs a positive sum; -1e6 + 1 is not
    ("fisher", "weight"): ({}, {"weight": 1.0}),  # the weights must not all be 0
}

CASES = sorted(RANGES)


def test_every_numeric_parameter_is_listed_and_declared():
    declared = {(name, f.metadata["yaml"]): str(f.metadata["valid"])
                for name, m in METHODS.items() for f in m.param_fields() if f.metadata.get("valid") is not None}
    assert declared == RANGES


@pytest.mark.parametrize("method, key", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_out_of_range_is_refused_naming_key_and_model(method, key):
    f = _field(method, key)
    r = f.metadata["valid"]
    for bad in _outside(r):
        if f.metadata["per_model"]:
            slot = "b" if method != "slerp" else "a"
            msg = _refused(_config(method, **{slot: {key: bad}}))
            url, index = (B, 1) if slot == "b" else (A, 0)
            assert f"models[{index}] ({url}) parameters.{key} = " in msg, msg
            # set for every model at the top level: names the first model it applies to
            msg = _refused(_config(method, top={key: bad}))
            assert f"parameters.{key} = " in msg and f"(for models[0] ({A})" in msg, msg
        else:
            msg = _refused(_config(method, top={key: bad}))
            assert f"parameters.{key} = " in msg, msg
        want = "must be a finite number" if not math.isfinite(bad) else f"must be {r.describe()}"
        assert want in msg, msg


@pytest.mark.parametrize("method, key", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_edge_values_are_accepted(method, key):
    f = _field(method, key)
    extra, other = _EDGE_CONTEXT.get((method, key), ({}, {}))
    b = other if method != "slerp" else None
    for ok in _edges(f.metadata["valid"]):
        if f.metadata["per_model"]:
            job = _parse(_config(method, top=extra, a={key: ok}))
            assert job.models[0].parameters[key] == ok
        _parse(_config(method, top={**extra, key: ok}, b=b))
        # as an anchor of a gradient and as a filtered value
        _parse(_config(method, top={**extra, key: [ok, ok]}, b=b))
        _parse(_config(method, top={**extra, key: [{"filter": "mlp", "value": ok}, {"value": ok}]}, b=b))


def test_gradient_anchors_and_filter_values_are_each_checked():
    msg = _refused(_config("ties", b={"density": [0.5, 0.7, 1.2]}))
    assert f"models[1] ({B}) parameters.density[2] = 1.2: must be in [0, 1]" in msg
    msg = _refused(_config("ties", b={"density": [{"filter": "mlp", "value": [0.5, -0.1]}, {"value": 0.3}]}))
    assert f"models[1] ({B}) parameters.density[0].value[1] = -0.1: must be in [0, 1]" in msg
    msg = _refused(_config("slerp", top={"t": [{"filter": "self_attn", "value": 0.2}, {"value": 1.5}]}))
    assert "parameters.t[1].value = 1.5: must be in [0, 1]" in msg
    # a top-level value every model overrides is still refused, naming no model
    msg = _refused(_config("ties", top={"density": -1}, a={"density": 0.5}, b={"density": 0.5}))
    assert "parameters.density = -1: must be in [0, 1]" in msg and "models[" not in msg


def test_the_issue_examples():
    msg = _refused(_config("ties", b={"density": -1}))
    assert msg.startswith(f"cfg.yaml: models[1] ({B}) parameters.density = -1: must be in [0, 1]")
    msg = _refused(_config("ties", a={"density": 2.0}))
    assert msg.startswith(f"cfg.yaml: models[0] ({A}) parameters.density = 2.0: must be in [0, 1]")


@pytest.mark.parametrize("value", [True, False, "0.5", "1e-5", None])
def test_bools_and_strings_are_not_numbers(value):
    msg = _refused(_config("ties", b={"density": value}))
    assert f"models[1] ({B}) parameters.density" in msg
    assert "expected a number" in msg


def test_bool_and_string_parameters_take_only_bools_and_strings():
    msg = _refused(_config("ties", top={"normalize": 1}))
    assert "parameters.normalize = 1: expected true or false" in msg
    msg = _refused(_config("sar", top={"rescale": 2}))
    assert "parameters.rescale = 2: expected a string" in msg


def test_negative_weights_keep_mergekit_meaning():
    for method in ("task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs", "sar"):
        _parse(_config(method, a={"weight": -1.0}, b={"weight": 1.0}))
    # linear: extrapolation with a negative weight (the weights still sum to 1)
    _parse(_config("linear", a={"weight": 1.3}, b={"weight": -0.3}))
    # lambda < 0 subtracts the merged update
    _parse(_config("ties", top={"lambda": -0.5}))
    # fisher: the weights are mixing coefficients
    msg = _refused(_config("fisher", b={"weight": -0.5}))
    assert f"models[1] ({B}) parameters.weight = -0.5: must be >= 0" in msg


# ---- constraints across parameters


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_window_must_fit_in_0_1(method):
    msg = _refused(_config(method, b={"density": 0.1}))  # epsilon 0.15 (default): 0.1 - 0.15 <= 0
    assert f"models[1] ({B}) parameters density = 0.1, epsilon = 0.15" in msg
    assert "density - epsilon > 0 and density + epsilon < 1" in msg
    msg = _refused(_config(method, top={"density": 0.9, "epsilon": 0.1}))  # 0.9 + 0.1 >= 1, as mergekit tests it
    assert f"models[0] ({A}) parameters density = 0.9, epsilon = 0.1" in msg
    _parse(_config(method, top={"density": 0.5, "epsilon": 0.49}))
    # density 0 and 1 take no window (mergekit returns before the check), whatever epsilon
    _parse(_config(method, a={"density": 0.0, "epsilon": 0.4}, b={"density": 1.0, "epsilon": 0.4}))


def test_della_window_over_gradients_is_exact():
    # density falls from 1 to 0.5: just past layer 0 it is near 1, and near 1 + 0.15 > 1
    msg = _refused(_config("della", a={"density": [1.0, 0.5]}))
    assert "just beside layer position t = 0" in msg and f"models[0] ({A})" in msg
    # rising from 0 with epsilon 0 is fine everywhere (0 < density < 1 in between)
    _parse(_config("della", top={"density": [0.0, 1.0], "epsilon": 0.0}))
    # both vary: the window narrows with the density and stays inside
    _parse(_config("della", top={"density": [0.2, 0.8], "epsilon": [0.15, 0.15]}))
    # fine at both anchors (0.2 +- 0.1, 0.5 +- 0.4), so (the margins being affine) everywhere between
    _parse(_config("della", top={"density": [0.2, 0.5], "epsilon": [0.1, 0.4]}))
    msg = _refused(_config("della", top={"density": [0.2, 0.5], "epsilon": [0.3, 0.1]}))
    assert "at layer position t = 0" in msg


def test_della_window_with_filters():
    same = {"density": [{"filter": "mlp", "value": 0.1}, {"value": 0.5}],
            "epsilon": [{"filter": "mlp", "value": 0.05}, {"value": 0.2}]}
    _parse(_config("della", top=same))
    other = {"density": [{"filter": "mlp", "value": 0.1}, {"value": 0.5}], "epsilon": 0.2}
    msg = _refused(_config("della", top=other))
    assert "for tensors whose names contain 'mlp'" in msg and "density = 0.1, epsilon = 0.2" in msg


def test_della_window_matches_mergekit():
    sparsify = pytest.importorskip("mergekit.sparsify")
    import torch

    x = torch.randn(4, 8)
    for density in (0.0, 0.1, 0.3, 0.5, 0.65, 0.9, 1.0):
        for epsilon in (0.0, 0.1, 0.15, 0.35, 0.45):
            try:
                sparsify.della_magprune(x, density, epsilon)
                mergekit_ok = True
            except ValueError:
                mergekit_ok = False
            try:
                _parse(_config("della", top={"density": density, "epsilon": epsilon}))
                ours = True
            except ValueError:
                ours = False
            assert ours == mergekit_ok, (density, epsilon)


def test_linear_normalized_weights_must_sum_above_zero():
    msg = _refused(_config("linear", a={"weight": 1.0}, b={"weight": -1.0}))
    assert f"models[0] ({A}), models[1] ({B}): parameters weight = 1.0, -1.0, normalize = true" in msg
    assert "must sum to more than 0" in msg
    # a gradient crossing zero somewhere in the stack
    msg = _refused(_config("linear", a={"weight": [1.0, -1.0]}, b={"weight": 0.5}))
    assert "layer position" in msg
    _parse(_config("linear", top={"normalize": False}, a={"weight": 1.0}, b={"weight": -1.0}))


def test_fisher_weights_must_not_all_be_zero():
    msg = _refused(_config("fisher", top={"weight": 0.0}))
    assert "must sum to more than 0" in msg
    _parse(_config("fisher", a={"weight": 0.0}))


def test_resolve_checks_each_tensor_too():
    """A job built without from_dict still gets plain values checked per tensor."""
    with pytest.raises(ValueError, match=r"density = 1.5 \(model 1, tensor x\): must be in \[0, 1\]"):
        resolve(get_method("ties"), "x", 0.0, {"weight": 1.0}, [{}, {"density": 1.5}])
    with pytest.raises(ValueError, match=r"model 0, tensor x\): need density - epsilon"):
        resolve(get_method("della"), "x", 0.0, {"weight": 1.0, "density": 0.1}, [{}])


def test_registry_requires_a_range_on_every_numeric_field():
    @dataclass(frozen=True, kw_only=True, slots=True)
    class NoRange:
        x: float = method_param("x", 1.0)

    with pytest.raises(TypeError, match="declares no valid=Interval"):
        check_params_cls(NoRange)

    @dataclass(frozen=True, kw_only=True, slots=True)
    class DefaultOutside:
        x: tuple[float, ...] = per_model("x", 2.0, valid=Interval(0.0, 1.0))

    with pytest.raises(TypeError, match="default 2.0 is not in"):
        check_params_cls(DefaultOutside)

    @dataclass(frozen=True, kw_only=True, slots=True)
    class BoolWithRange:
        b: bool = method_param("b", True, valid=ANY_REAL)

    with pytest.raises(TypeError, match="is not numeric"):
        check_params_cls(BoolWithRange)
    for m in METHODS.values():
        for f in dataclasses.fields(m.params_cls):
            default = f.metadata["default"]
            if f.metadata.get("valid") is not None and isinstance(default, float):
                assert default in f.metadata["valid"]


def test_interval():
    r = Interval(0.0, 1.0, lo_open=True)
    assert 0.5 in r and 1 in r and 0 not in r and True not in r and math.nan not in r
    assert str(r) == "(0, 1]" and r.describe() == "in (0, 1]"
    assert ANY_REAL.describe() == "a finite number" and math.inf not in ANY_REAL
    with pytest.raises(ValueError):
        Interval(1.0, 0.0)


def test_example_configs_parse():
    import yaml

    from tests.conftest import REPO

    for path in sorted((REPO / "configs").glob("*.yaml")):
        MergeJob.from_dict(yaml.safe_load(path.read_text()), where=str(path))


# ---- the CLI: exit 2, one line, nothing written, no input byte changed


def _digests(*roots: str) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["density", "della_window"])
def test_cli_refuses_out_of_range_before_any_work(tmp_path, tiny_models, case):
    out = tmp_path / "out"
    if case == "density":
        text = (f"merge_method: ties\nbase_model: {tiny_models['base']}\nmodels:\n"
                f"  - model: {tiny_models['ft1']}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                f"  - model: {tiny_models['ft2']}\n    parameters: {{weight: 1.0, density: -1}}\n"
                f"output: {out}\n")
        want = f"models[1] ({tiny_models['ft2']}) parameters.density = -1: must be in [0, 1]"
    else:
        text = (f"merge_method: della\nbase_model: {tiny_models['base']}\nmodels:\n"
                f"  - model: {tiny_models['ft1']}\n    parameters: {{weight: 1.0, density: [1.0, 0.5]}}\n"
                f"  - model: {tiny_models['ft2']}\n    parameters: {{weight: 1.0}}\n"
                f"parameters: {{density: 0.5, epsilon: 0.15}}\noutput: {out}\n")
        want = f"models[0] ({tiny_models['ft1']}) parameters density = 1.0, epsilon = 0.15"
    cfg = write_config(tmp_path / "c.yaml", text)
    before = _digests(*tiny_models.values())
    r = run_cli("merge", cfg, "--executor", "local")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sar-dist: error:"), r.stderr
    assert want in lines[0] and cfg in lines[0], lines[0]
    assert not out.exists()
    assert _digests(*tiny_models.values()) == before
