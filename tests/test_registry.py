"""The method registry: names, parameter classes, docstrings, lookup errors."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from sar_dist.merge.base import REQUIRED, MergeMethod
from sar_dist.merge.registry import METHODS, check_params_cls, get_method

EXPECTED = {
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "ram",
    "ramplus_tl",
    "sar",
    "fisher",
}


def test_registry_names():
    assert set(METHODS) == EXPECTED
    for key, method in METHODS.items():
        assert isinstance(method, MergeMethod)
        assert key == method.name == method.fn.__name__


@pytest.mark.parametrize("name", sorted(METHODS))
def test_params_class_is_frozen_kw_only_slots(name):
    cls = METHODS[name].params_cls
    check_params_cls(cls)
    assert cls.__dataclass_params__.frozen
    assert "__slots__" in cls.__dict__
    assert all(f.kw_only for f in dataclasses.fields(cls))
    # Defaults construct (REQUIRED fields hold placeholders) and the params hash and pickle for Ray tasks.
    p = cls()
    assert pickle.loads(pickle.dumps(p)) == p
    hash(p)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(p, dataclasses.fields(cls)[0].name, 0)
    with pytest.raises(TypeError):
        cls(1)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_docstring_mentions_paper(name):
    method = METHODS[name]
    doc = method.fn.__doc__ or ""
    assert method.paper_url.startswith("https://")
    assert method.paper_url in doc
    assert "Args:" in doc and "Returns:" in doc
    assert doc.isascii()


def test_params_metadata():
    for method in METHODS.values():
        for f in method.param_fields():
            assert f.metadata["yaml"] and isinstance(f.metadata["per_model"], bool)
            if f.metadata["per_model"]:
                assert f.name.endswith("s") and f.default == ()
    fields = {f.metadata["yaml"]: f.metadata for f in METHODS["della"].param_fields()}
    assert fields["weight"]["default"] is REQUIRED and fields["weight"]["per_model"]
    assert fields["epsilon"]["default"] == 0.15 and fields["epsilon"]["per_model"]
    assert fields["normalize"]["default"] is True and fields["rescale"]["default"] is True
    assert not fields["lambda"]["per_model"] and not fields["int8_mask"]["per_model"]
    assert {f.metadata["yaml"]: f.metadata["default"] for f in METHODS["ties"].param_fields()}["normalize"] is True
    assert {f.metadata["yaml"] for f in METHODS["ram"].param_fields()} == {"epsilon"}
    assert METHODS["slerp"].min_models == METHODS["slerp"].max_models == 1
    assert not METHODS["linear"].needs_base
    assert all(m.needs_base for n, m in METHODS.items() if n not in ("linear", "fisher"))
    assert {n for n, m in METHODS.items() if m.needs_fisher} == {"sar", "fisher"}


def test_get_method():
    assert get_method("ties") is METHODS["ties"]
    with pytest.raises(ValueError, match=r"unknown merge_method 'tie'; known: breadcrumbs, breadcrumbs_ties, "):
        get_method("tie")


def test_check_params_cls_rejects_bad_classes():
    @dataclasses.dataclass(frozen=True, slots=True)
    class NotKwOnly:
        x: float = 1.0

    @dataclasses.dataclass(kw_only=True, slots=True)
    class NotFrozen:
        x: float = 1.0

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class NoSlots:
        x: float = 1.0

    @dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
    class NoMetadata:
        x: float = 1.0

    for cls in (NotKwOnly, NotFrozen, NoSlots, NoMetadata, int):
        with pytest.raises(TypeError):
            check_params_cls(cls)
