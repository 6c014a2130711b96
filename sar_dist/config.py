"""The merge job: the one way a YAML config enters the library.

``MergeJob.from_dict`` validates everything that can be checked without reading a
checkpoint (keys, method, parameter names and shapes, dtypes, URLs present, no secrets)
and raises one ``ValueError`` naming the file and key. mergekit's keys are used where
they exist, so a user's mergekit config runs unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sar_dist.checkpoint.format import DTYPE_NAMES
from sar_dist.merge.base import REQUIRED, MergeMethod
from sar_dist.merge.registry import get_method
from sar_dist.plan.params import check_parameters
from sar_dist.storage import check_no_userinfo, display_url

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000

_TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "output",
    "seed",
    "storage_options",
    "out_shard_size",
    "allow_nonfinite",
}
_MODEL_KEYS = {"model", "parameters", "fisher"}
_UNSUPPORTED = {
    "slices": "'slices' (layer-range merges) is not supported; list whole models under 'models'",
    "modules": "'modules' is not supported; list whole models under 'models'",
    "tokenizer": "the 'tokenizer' section is not supported; use 'tokenizer_source: base' or a model URL",
    "chat_template": "'chat_template' is not supported; the tokenizer files of tokenizer_source are copied as they are",
}
# storage_options keys that carry credentials: they come from the environment instead
_SECRET_KEY = re.compile(r"(secret|password|token|^key$|credential|private)", re.IGNORECASE)


def load_yaml(path: str) -> Any:
    """Parse a YAML config file (merge or Fisher), refusing duplicate keys at any depth.

    PyYAML keeps the last of two equal keys, so ``merge_method`` written twice would run
    with whichever came last; a config that says two things is refused instead.

    Raises:
        ValueError: missing file, invalid YAML or a duplicate key (naming the line).
    """
    import yaml

    class _Strict(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        loader.flatten_mapping(node)  # resolves YAML merge keys (<<) first, as SafeLoader does
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ValueError(f"{path}: duplicate key '{key}' (line {line}; first at line {seen[key]})")
            seen[key] = line
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    _Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_Strict)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise ValueError(f"{path}: config file not found") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None


def parse_size(text: str | int | float, what: str = "size") -> int:
    """Parse ``5GB``, ``512MiB``, ``1e9`` or a number of bytes.

    Raises:
        ValueError: if it is not a positive size.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise ValueError(f"{what}: cannot parse size {text!r} (examples: 5GB, 512MiB, 1000000)")
        unit = (m.group(2) or "").upper().rstrip("B")
        scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                 "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
        value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"{what}: size must be positive, got {text!r}")
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelRef:
    """One input model.

    Attributes:
        model: checkpoint URL.
        fisher: Fisher statistics URL (needed by ``fisher`` and ``sar``).
        parameters: raw per-model parameter values (scalars, gradients, filter lists).
    """

    model: str
    fisher: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class MergeJob:
    """A validated merge config.

    Attributes:
        merge_method: registry name.
        models: inputs in config order (may include the base model, as mergekit allows).
        base_model: base checkpoint URL, or None (``linear``).
        parameters: raw top-level parameter values.
        dtype: compute dtype name, or None for float32 (docs/methods.md, "Numerics and dtypes").
        out_dtype: output dtype name, or None (then ``dtype``, else each tensor's own).
        tokenizer_source: ``"base"``, a model URL, or None (no tokenizer files copied).
        output: output directory URL.
        seed: seed for every random choice (keyed by tensor and block).
        storage_options: fsspec options (no secrets).
        max_shard_bytes: target output shard size.
        allow_nonfinite: accept NaN/inf in inputs and merged tensors (default: stop with exit 2).
    """

    merge_method: str
    models: tuple[ModelRef, ...]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    output: str
    seed: int = 0
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    allow_nonfinite: bool = False

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    def input_models(self) -> list[ModelRef]:
        """The models the method combines, in order.

        For methods with a base, every listed model but the base (mergekit lets users list
        the base among ``models``). For methods without one (``linear``), every listed model
        and, as in mergekit, the ``base_model`` too when it is not listed: it is then just
        another input, weighted by the top-level parameters.
        """
        return _input_models(self.method, self.models, self.base_model)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config", **overrides: Any) -> MergeJob:
        """Validate a config mapping (parsed YAML).

        Args:
            d: the mapping.
            where: file name for messages.
            **overrides: values that replace the file's (from CLI flags), e.g. ``output``.

        Returns:
            The job.

        Raises:
            ValueError: naming the file and the key at fault.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a mapping at the top level, got {type(d).__name__}")
        d = {**d, **{k: v for k, v in overrides.items() if v is not None}}
        for key in d:
            if key in _UNSUPPORTED:
                raise ValueError(f"{where}: {_UNSUPPORTED[key]}")
            if key not in _TOP_KEYS:
                raise ValueError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(_TOP_KEYS))})")
        if "merge_method" not in d:
            raise ValueError(f"{where}: missing 'merge_method'")
        try:
            method = get_method(str(d["merge_method"]))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

        base = _opt_url(d.get("base_model"), f"{where}: base_model")
        raw_models = d.get("models")
        if not isinstance(raw_models, list) or not raw_models:
            raise ValueError(f"{where}: 'models' must be a non-empty list of {{model: URL}} entries")
        models = tuple(_model_ref(m, f"{where}: models[{i}]") for i, m in enumerate(raw_models))

        params = d.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise ValueError(f"{where}: 'parameters' must be a mapping")
        _check_params(method, params, per_model=False, where=f"{where}: parameters")
        for i, m in enumerate(models):
            _check_params(method, m.parameters, per_model=True, where=f"{where}: models[{i}] ({display_url(m.model)}) parameters")

        inputs = _input_models(method, models, base)
        _check_required(method, params, inputs, where)
        labels = {id(m): f"models[{i}] ({display_url(m.model)})" for i, m in enumerate(models)}
        check_parameters(  # every value a parameter can take inside its field's interval, constraints met
            method, params, [(labels.get(id(m), f"base_model ({display_url(m.model)})"), m.parameters) for m in inputs],
            where, others=[(labels[id(m)], m.parameters) for m in models if all(m is not x for x in inputs)],
        )
        if method.needs_base and base is None:
            raise ValueError(f"{where}: merge_method '{method.name}' needs 'base_model'")
        num_inputs = len(inputs)
        if num_inputs < method.min_models or (method.max_models is not None and num_inputs > method.max_models):
            want = (f"exactly {method.min_models}" if method.min_models == method.max_models
                    else f"at least {method.min_models}")
            raise ValueError(f"{where}: merge_method '{method.name}' takes {want} non-base model(s), got {num_inputs}")
        if method.needs_fisher:
            for m in inputs:
                if m.fisher is None:
                    which = (f"models[{models.index(m)}] ({m.model})" if m in models
                             else f"base_model {m.model} (merged as an input by '{method.name}': list it under models)")
                    raise ValueError(f"{where}: {which} needs 'fisher:' statistics for '{method.name}'")

        dtype = _dtype(d.get("dtype"), f"{where}: dtype")
        out_dtype = _dtype(d.get("out_dtype"), f"{where}: out_dtype")
        tok = d.get("tokenizer_source")
        if tok is not None:
            tok = str(tok)
            check_no_userinfo(tok, f"{where}: tokenizer_source")
            if tok == "union":
                raise ValueError(f"{where}: tokenizer_source 'union' is not supported; use 'base' or a model URL")
            if tok == "base" and base is None:
                raise ValueError(f"{where}: tokenizer_source 'base' needs 'base_model'")
        output = d.get("output")
        if not isinstance(output, str) or not output:
            raise ValueError(f"{where}: missing 'output' (set it in the config or pass --output)")
        check_no_userinfo(output, f"{where}: output")
        seed = d.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"{where}: seed must be a non-negative integer, got {seed!r}")
        so = d.get("storage_options") or {}
        if not isinstance(so, Mapping):
            raise ValueError(f"{where}: storage_options must be a mapping")
        _check_no_secrets(so, f"{where}: storage_options")
        shard = parse_size(d.get("out_shard_size", DEFAULT_MAX_SHARD_BYTES), f"{where}: out_shard_size")
        allow_nonfinite = d.get("allow_nonfinite", False)
        if not isinstance(allow_nonfinite, bool):
            raise ValueError(f"{where}: allow_nonfinite must be true or false, got {allow_nonfinite!r}")
        return cls(
            merge_method=method.name,
            models=models,
            base_model=base,
            parameters=dict(params),
            dtype=dtype,
            out_dtype=out_dtype,
            tokenizer_source=tok,
            output=output,
            seed=seed,
            storage_options=dict(so),
            max_shard_bytes=shard,
            allow_nonfinite=allow_nonfinite,
        )

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what ``sar_merge.json`` records)."""
        out: dict[str, Any] = {
            "merge_method": self.merge_method,
            "base_model": self.base_model,
            "models": [
                {k: v for k, v in dataclasses.asdict(m).items() if v not in (None, {})} for m in self.models
            ],
            "parameters": self.parameters,
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "tokenizer_source": self.tokenizer_source,
            "output": self.output,
            "seed": self.seed,
            "storage_options": self.storage_options,
            "out_shard_size": self.max_shard_bytes,
            "allow_nonfinite": self.allow_nonfinite,
        }
        return out


def _input_models(method: MergeMethod, models: tuple[ModelRef, ...], base: str | None) -> list[ModelRef]:
    if method.needs_base:
        return [m for m in models if m.model != base]
    if base is not None and method.merges_base and all(m.model != base for m in models):
        return [ModelRef(model=base), *models]
    return list(models)


def _opt_url(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: expected a path or URL string, got {value!r}")
    check_no_userinfo(value, where)
    if "+" in value and "://" not in value and not value.startswith(("/", ".")):
        raise ValueError(f"{where}: LoRA 'model+adapter' references are not supported: {value}")
    return value


def _model_ref(entry: Any, where: str) -> ModelRef:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected {{model: URL, parameters: {{...}}}}, got {entry!r}")
    for key in entry:
        if key not in _MODEL_KEYS:
            raise ValueError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(_MODEL_KEYS))})")
    model = _opt_url(entry.get("model"), f"{where}.model")
    if model is None:
        raise ValueError(f"{where}: missing 'model'")
    params = entry.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"{where}.parameters: must be a mapping")
    return ModelRef(model=model, fisher=_opt_url(entry.get("fisher"), f"{where}.fisher"), parameters=dict(params))


def _dtype(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if value not in DTYPE_NAMES:
        raise ValueError(f"{where}: unknown dtype {value!r} (known: {', '.join(DTYPE_NAMES)})")
    return str(value)


def _check_no_secrets(options: Mapping[str, Any], where: str) -> None:
    for key, value in options.items():
        if _SECRET_KEY.search(str(key)):
            raise ValueError(
                f"{where}: '{key}' looks like a credential; credentials come from the environment "
                f"(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or the storage's own config, never the YAML"
            )
        if isinstance(value, Mapping):
            _check_no_secrets(value, f"{where}.{key}")
        elif isinstance(value, str):
            check_no_userinfo(value, f"{where}.{key}")  # endpoint_url: http://KEY:SECRET@host


def _check_params(method: MergeMethod, params: Mapping[str, Any], *, per_model: bool, where: str) -> None:
    """Check names and value shapes; values are resolved per tensor in plan/params.py."""
    fields = {f.metadata["yaml"]: f for f in method.param_fields()}
    for name, value in params.items():
        f = fields.get(name)
        if f is None:
            known = ", ".join(sorted(fields)) or "none"
            raise ValueError(f"{where}: unknown parameter '{name}' for merge_method '{method.name}' (known: {known})")
        if per_model and not f.metadata["per_model"]:
            raise ValueError(f"{where}: '{name}' is a method-wide parameter of '{method.name}'; set it under top-level 'parameters'")
        _check_value(value, f"{where}.{name}")


def _check_required(method: MergeMethod, params: Mapping[str, Any], inputs: list[ModelRef], where: str) -> None:
    for f in method.param_fields():
        key = f.metadata["yaml"]
        if f.metadata["default"] is not REQUIRED or key in params:
            continue
        if not f.metadata["per_model"]:
            raise ValueError(f"{where}: merge_method '{method.name}' needs parameter '{key}' under 'parameters'")
        for m in inputs:
            if key not in m.parameters:
                raise ValueError(
                    f"{where}: merge_method '{method.name}' needs parameter '{key}' for model {m.model} "
                    f"(set it in the model's parameters or the top-level parameters)"
                )


def _check_value(value: Any, where: str) -> None:
    if isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list) and value:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return  # a gradient over layers
        if all(isinstance(v, Mapping) for v in value):
            for j, entry in enumerate(value):
                extra = set(entry) - {"filter", "value"}
                if extra or "value" not in entry:
                    raise ValueError(f"{where}[{j}]: expected {{filter: str, value: ...}}, got {dict(entry)!r}")
                if "filter" in entry and not isinstance(entry["filter"], str):
                    raise ValueError(f"{where}[{j}].filter: must be a string")
                _check_value(entry["value"], f"{where}[{j}].value")
            return
    raise ValueError(
        f"{where}: expected a number, a list of numbers (layer gradient) or a list of {{filter, value}}, got {value!r}"
    )
