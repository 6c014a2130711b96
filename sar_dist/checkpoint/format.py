"""The safetensors file format: header bytes <-> ``TensorInfo``.

Layout (safetensors README, "Format"): 8 bytes little-endian u64 ``N``; ``N`` bytes of
UTF-8 JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the end of the header) plus an optional ``"__metadata__"`` string
map; the JSON is padded with spaces to a multiple of 8; then the data, contiguous and
row-major little-endian. We write tensors ordered by (itemsize descending, name) and the
JSON in data order, compact, which is exactly what ``safetensors.torch.save`` writes, so
our shards are byte-identical to the reference serializer for the same tensors.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# safetensors dtype string -> (torch dtype, itemsize in bytes)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
TORCH_TO_ST: dict[torch.dtype, str] = {t: s for s, (t, _) in DTYPES.items()}

# user-facing dtype names (mergekit's) -> safetensors dtype string
DTYPE_NAMES: dict[str, str] = {
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

# Every dtype the safetensors library (0.8) accepts -> its width in bits. DTYPES is the
# subset sar-dist can decode; the rest pass validation and are then refused by name.
SAFETENSORS_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip

# The limits safetensors itself enforces (decimal bytes, not MiB; serde_json refuses a
# 128th nested container; shapes and offsets are Rust usize, 64-bit).
MAX_HEADER_BYTES = 100_000_000
MAX_JSON_DEPTH = 127
USIZE_MAX = 2**64 - 1
HEADER_PROBE_BYTES = 64 * 1024  # first read of a remote header; most fit


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorInfo:
    """Where one tensor lives inside a safetensors file.

    Attributes:
        dtype: safetensors dtype string (``"BF16"``).
        shape: tensor shape.
        offset: absolute byte offset of its data in the file.
        nbytes: length of its data.
    """

    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]


class _JsonObject(list[tuple[str, object]]):
    """A JSON object kept as its ``(key, value)`` pairs, duplicates and order included:
    safetensors (serde) refuses some duplicate keys and takes the last of others."""


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # serde_json: "number out of range"; Python would give inf
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _json_int(text: str) -> int | float:
    # serde_json reads an integer outside i64/u64 (and "-0") as a float, so a usize field
    # refuses it; Python would give a bigint (or 0). 21+ characters is always outside.
    if text == "-0" or len(text) > 20:
        return _json_float(text)
    value = int(text)
    return value if -(2**63) <= value <= USIZE_MAX else _json_float(text)


def _json_constant(text: str) -> float:
    raise ValueError(f"{text} is not JSON")  # NaN, Infinity: Python extensions


# only a \u escape can make a surrogate; without one the string walk can be skipped
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _load_json(text: str) -> object:
    """``json.loads`` held to what serde_json (the library's parser) accepts.

    Raises:
        ValueError: invalid JSON, or JSON that Python takes but serde_json does not.
    """
    try:
        value = json.loads(
            text,
            object_pairs_hook=_JsonObject,
            parse_int=_json_int,
            parse_float=_json_float,
            parse_constant=_json_constant,
        )
    except RecursionError:
        raise ValueError("recursion limit exceeded") from None
    check_strings = _SURROGATE_ESCAPE.search(text) is not None
    if check_strings and isinstance(value, str) and not _no_surrogates(value):
        raise ValueError("lone surrogate in a \\u escape")
    # containers only (a _JsonObject is a list too); leaves are looked at from their parent
    stack: list[tuple[list, int]] = [(value, 1)] if isinstance(value, list) else []
    while stack:
        container, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError("recursion limit exceeded")
        is_object = isinstance(container, _JsonObject)
        for child in container:
            if is_object:
                key, child = child
                if check_strings and not _no_surrogates(key):
                    raise ValueError("lone surrogate in a \\u escape")
            if isinstance(child, list):
                stack.append((child, depth + 1))
            elif check_strings and isinstance(child, str) and not _no_surrogates(child):
                raise ValueError("lone surrogate in a \\u escape")
    return value


def _no_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")  # fails exactly on surrogates, which serde_json refuses
    except UnicodeEncodeError:
        return False
    return True


def _brief(value: object) -> str:
    """A value as short JSON, for messages."""

    def plain(v: object) -> object:
        if isinstance(v, _JsonObject):
            return {k: plain(x) for k, x in v}
        return [plain(x) for x in v] if isinstance(v, list) else v

    text = json.dumps(plain(value), ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_usize(v: object) -> bool:
    # bool is an int in Python but not in JSON; floats (64.0 too) are refused by serde
    return type(v) is int and 0 <= v <= USIZE_MAX


def _tensor_entry(value: object) -> tuple[str, tuple[int, ...], int, int]:
    """Deserialize one tensor entry as safetensors' ``TensorInfo`` does (serde derive).

    Returns:
        ``(dtype, shape, begin, end)``, types checked, not yet sizes or offsets.

    Raises:
        ValueError: the reason, without the tensor name.
    """
    fields = ("dtype", "shape", "data_offsets")
    if isinstance(value, _JsonObject):
        found: dict[str, object] = {}
        for key, v in value:
            if key in fields:  # unknown keys are ignored, known ones must be unique
                if key in found:
                    raise ValueError(f"duplicate field {key!r}")
                found[key] = v
        missing = [f for f in fields if f not in found]
        if missing:
            raise ValueError(f"missing field {missing[0]!r}")
        dtype, shape, offsets = (found[f] for f in fields)
    elif isinstance(value, list):  # serde also reads a struct from a [dtype, shape, offsets] list
        if len(value) != 3:
            raise ValueError(f"a list entry needs 3 elements, got {len(value)}")
        dtype, shape, offsets = value
    else:
        raise ValueError(f"expected an object, got {_brief(value)}")
    if isinstance(dtype, _JsonObject) and len(dtype) == 1 and dtype[0][1] is None:
        dtype = dtype[0][0]  # serde's external enum form {"F32": null}
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be a string, got {_brief(dtype)}")
    if dtype not in SAFETENSORS_DTYPE_BITS:
        raise ValueError(f"unsupported dtype {_brief(dtype)} (not a safetensors dtype)")
    if type(shape) is not list or not all(_is_usize(d) for d in shape):
        raise ValueError(f"shape must be a list of non-negative integers, got {_brief(shape)}")
    if type(offsets) is not list or len(offsets) != 2 or not all(_is_usize(x) for x in offsets):
        raise ValueError(f"data_offsets must be [begin, end] non-negative integers, got {_brief(offsets)}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int | None:
    """Bytes the tensor needs, or None where safetensors refuses the shape: an element count
    or bit count past usize, multiplied left to right as it does, or a partial last byte."""
    count = 1
    for d in shape:
        count *= d
        if count > USIZE_MAX:
            return None
    bits = count * SAFETENSORS_DTYPE_BITS[dtype]
    return bits // 8 if bits <= USIZE_MAX and bits % 8 == 0 else None


def parse_header(
    prefix: bytes, file_size: int, where: str
) -> tuple[int, dict[str, TensorInfo], dict[str, str]] | int:
    """Parse a safetensors header from the first bytes of a file.

    Accepts exactly what the ``safetensors`` library accepts (``tests/test_header_fuzz.py``
    holds it to that), except that it refuses by name the dtypes sar-dist cannot decode.

    Args:
        prefix: the file's first bytes (at least 8).
        file_size: the file's total size, to check offsets against.
        where: file name/URL for messages.

    Returns:
        ``(data_start, tensors, metadata)``; or, if ``prefix`` is too short to hold the
        whole header, the number of bytes needed (the caller reads more and retries).

    Raises:
        ValueError: on any malformed or inconsistent header.
    """
    if file_size < 8 or len(prefix) < 8:
        raise ValueError(f"{where}: not a safetensors file (only {file_size} bytes)")
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise ValueError(
            f"{where}: corrupt or truncated safetensors header (declares {n} header bytes, file has {file_size})"
        )
    if len(prefix) < 8 + n:
        return 8 + n
    try:
        raw = _load_json(bytes(prefix[8 : 8 + n]).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: corrupt safetensors header (invalid UTF-8: {e.reason} at byte {8 + e.start})") from None
    except ValueError as e:  # json.JSONDecodeError or our stricter checks
        raise ValueError(f"{where}: corrupt safetensors header ({e})") from None
    if not isinstance(raw, _JsonObject):
        raise ValueError(f"{where}: corrupt safetensors header (not a JSON object)")

    metadata: dict[str, str] = {}
    seen_metadata = False
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, value in raw:
        if name == "__metadata__":
            if seen_metadata:
                raise ValueError(f"{where}: corrupt safetensors header (duplicate '__metadata__')")
            seen_metadata = True
            if value is None:
                continue
            if not isinstance(value, _JsonObject) or not all(isinstance(v, str) for _, v in value):
                raise ValueError(f"{where}: corrupt safetensors header (__metadata__ must map str to str)")
            metadata = dict(value)  # a repeated key: the last wins, as in the library
            continue
        try:
            entries[name] = _tensor_entry(value)  # a repeated tensor name: the last wins
        except ValueError as e:
            raise ValueError(f"{where}: corrupt safetensors header entry for tensor {name!r}: {e}") from None

    data_start = 8 + n
    data_size = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, (dtype, shape, begin, end) in entries.items():
        expected = _tensor_nbytes(dtype, shape)
        if expected is None:
            raise ValueError(f"{where}: tensor {name!r} has an impossible size: {dtype}{list(shape)}")
        if begin > end:
            raise ValueError(f"{where}: tensor {name!r} has data_offsets [{begin}, {end}] that end before they begin")
        if end - begin != expected:
            raise ValueError(
                f"{where}: tensor {name!r} spans {end - begin} bytes but {dtype}{list(shape)} needs {expected}"
            )
        if end > data_size:
            raise ValueError(
                f"{where}: truncated: tensor {name!r} ends at byte {data_start + end}, file has {file_size}"
            )
        tensors[name] = TensorInfo(dtype=dtype, shape=shape, offset=data_start + begin, nbytes=end - begin)

    # the library sorts by (begin, end) and wants each tensor to start where the last ended
    pos, previous = 0, None
    for name in sorted(entries, key=lambda k: entries[k][2:]):
        begin, end = entries[name][2:]
        if begin < pos:
            raise ValueError(f"{where}: tensors {previous!r} and {name!r} overlap in the file")
        if begin > pos:
            raise ValueError(f"{where}: {begin - pos} unused bytes before tensor {name!r} in the file")
        pos, previous = end, name
    if pos != data_size:
        raise ValueError(f"{where}: {data_size - pos} bytes after the last tensor are not covered by the header")

    for name, info in tensors.items():
        if info.dtype not in DTYPES:
            raise ValueError(
                f"{where}: tensor {name!r} has unsupported dtype {info.dtype!r} "
                "(valid safetensors, but sar-dist cannot decode it)"
            )
    return data_start, tensors, metadata


def pack_in_order(sizes: Sequence[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy shard packing in the given order: a new shard starts when the next item would
    push the current one past ``max_bytes`` (an item larger than that gets a shard alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in sizes:
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def order_for_writing(entries: Sequence[tuple[str, str, tuple[int, ...]]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """Order (name, dtype, shape) entries as safetensors lays them out: itemsize desc, name."""
    return sorted(entries, key=lambda e: (-DTYPES[e[1]][1], e[0]))


def build_header(
    entries: Sequence[tuple[str, str, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, list[tuple[str, int, int]]]:
    """Serialize the header for tensors that will follow in exactly this order.

    Args:
        entries: (name, safetensors dtype, shape), in data order.
        metadata: the ``__metadata__`` map (e.g. ``{"format": "pt"}``).

    Returns:
        ``(header_bytes, spans)``: the full prefix (8-byte length + padded JSON) and, per
        entry, ``(name, absolute_offset, nbytes)``.
    """
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    rel = []
    pos = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * DTYPES[dtype][1]
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        rel.append((name, pos, nbytes))
        pos += nbytes
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    prefix = len(text).to_bytes(8, "little") + text
    spans = [(name, len(prefix) + off, nbytes) for name, off, nbytes in rel]
    return prefix, spans


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when contiguous."""
    flat = t.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return memoryview(flat.view(torch.uint8).numpy())
