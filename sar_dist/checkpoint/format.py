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

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces
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


def parse_header(
    prefix: bytes, file_size: int, where: str
) -> tuple[int, dict[str, TensorInfo], dict[str, str]] | int:
    """Parse a safetensors header from the first bytes of a file.

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
        raw = json.loads(bytes(prefix[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: corrupt safetensors header ({e.__class__.__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: corrupt safetensors header (not a JSON object)")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError(f"{where}: corrupt safetensors header (__metadata__ must map str to str)")
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in raw.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: corrupt safetensors header entry for tensor '{name}'") from None
        if dtype not in DTYPES:
            raise ValueError(f"{where}: tensor '{name}' has unsupported dtype {dtype!r}")
        if any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise ValueError(f"{where}: tensor '{name}' has invalid shape or offsets")
        expected = math.prod(shape) * DTYPES[dtype][1]
        if end - begin != expected:
            raise ValueError(
                f"{where}: tensor '{name}' spans {end - begin} bytes but {dtype}{list(shape)} needs {expected}"
            )
        if data_start + end > file_size:
            raise ValueError(
                f"{where}: truncated: tensor '{name}' ends at byte {data_start + end}, file has {file_size}"
            )
        tensors[name] = TensorInfo(dtype=dtype, shape=shape, offset=data_start + begin, nbytes=end - begin)
        spans.append((begin, end, name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise ValueError(f"{where}: tensors '{n0}' and '{n1}' overlap in the file")
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
