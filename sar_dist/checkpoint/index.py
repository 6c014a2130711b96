"""Which file holds each tensor of a checkpoint, from its index JSON and headers only.

A checkpoint is a directory with ``<stem>.safetensors`` or ``<stem>.safetensors.index.json``
plus shards (``stem`` is ``model`` for weights, ``fisher`` for Fisher statistics). Each
shard's header is read once: 8 bytes + N bytes, with one request for most remote files.
Pickled weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are refused: loading them can
run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sar_dist.checkpoint.format import HEADER_PROBE_BYTES, TensorInfo, parse_header
from sar_dist.storage import Storage, display_url, join

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorRef:
    """One tensor of one checkpoint: the file URL and where the bytes are."""

    file: str
    info: TensorInfo


@dataclass(frozen=True, kw_only=True)
class CheckpointIndex:
    """Headers of a safetensors checkpoint.

    Attributes:
        url: the checkpoint directory.
        tensors: tensor name -> TensorRef, in the checkpoint's own order.
        files: shard file name -> (size in bytes, sha256 of its header bytes).
        metadata: the first shard's ``__metadata__``.
    """

    url: str
    tensors: dict[str, TensorRef]
    files: dict[str, tuple[int, str]]
    metadata: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """A cheap identity of the checkpoint: sha256 over its shards' sizes and headers.

        Two checkpoints with the same tensors and layout but different data have
        the same headers; that case is caught by the merge manifest's shard hashes, not
        here. This identifies *which* inputs a plan was made for without reading data.
        """
        h = hashlib.sha256()
        for name in sorted(self.files):
            size, header_sha = self.files[name]
            h.update(f"{name}\0{size}\0{header_sha}\n".encode())
        return h.hexdigest()


def layout_problems(ref_name: str, ref: CheckpointIndex, other: CheckpointIndex, what: str, *,
                    dtypes: bool = True) -> list[str]:
    """Every way ``other`` differs from ``ref`` in tensor names, shapes and (optionally) dtypes,
    one message each naming the file and tensor."""
    problems = []
    for name, r in ref.tensors.items():
        o = other.tensors.get(name)
        if o is None:
            problems.append(f"{what} {display_url(other.url)}: missing tensor '{name}' (present in {ref_name})")
        elif o.info.shape != r.info.shape:
            problems.append(
                f"{display_url(o.file)}: tensor '{name}' has shape {list(o.info.shape)}, "
                f"{ref_name} has {list(r.info.shape)}"
            )
        elif dtypes and o.info.dtype != r.info.dtype:
            problems.append(
                f"{display_url(o.file)}: tensor '{name}' is {o.info.dtype}, {ref_name} has {r.info.dtype}"
            )
    for name in other.tensors:
        if name not in ref.tensors:
            problems.append(f"{display_url(other.tensors[name].file)}: extra tensor '{name}' not in {ref_name}")
    return problems


SAMPLE_BLOCKS = 8
SAMPLE_BLOCK_BYTES = 2**16


def content_fingerprint(storage: Storage, index: CheckpointIndex, *, blocks: int = SAMPLE_BLOCKS,
                        block_bytes: int = SAMPLE_BLOCK_BYTES) -> str:
    """An identity of a checkpoint's DATA from a few range reads: sha256 over the header
    fingerprint and ``blocks`` blocks of ``block_bytes`` spread evenly over each shard.

    Header fingerprints cannot tell two fine-tunes of one base apart (same names, shapes and
    layout); these samples can: RLVR updates are sparse, but a 64 KiB block of bf16 holds 32768
    entries, so with even 0.01% of entries changed a block misses them all with probability
    0.04, and all 8 blocks of a shard with probability 5e-12. The cost is ``blocks`` reads per
    shard, whatever the model size.
    """
    h = hashlib.sha256(index.fingerprint().encode())
    for name in sorted(index.files):
        size, _ = index.files[name]
        url = join(index.url, name)
        span = max(size - block_bytes, 0)
        for i in range(blocks):
            start = span * i // max(blocks - 1, 1)
            h.update(bytes(storage.read_range(url, start, min(size, start + block_bytes))))
    return h.hexdigest()


def read_header(storage: Storage, url: str) -> tuple[dict[str, TensorInfo], dict[str, str], int, str]:
    """Read and validate one safetensors header.

    Returns:
        ``(tensors, metadata, file_size, header_sha256)``.

    Raises:
        ValueError: malformed header or missing file.
    """
    where = display_url(url)
    try:
        size = storage.size(url)
    except FileNotFoundError:
        raise ValueError(f"{where}: file not found") from None
    prefix = storage.read_range(url, 0, min(size, HEADER_PROBE_BYTES))
    parsed = parse_header(prefix, size, where)
    if isinstance(parsed, int):
        prefix = storage.read_range(url, 0, parsed)
        parsed = parse_header(prefix, size, where)
    assert not isinstance(parsed, int)
    data_start, tensors, metadata = parsed
    return tensors, metadata, size, hashlib.sha256(bytes(prefix[:data_start])).hexdigest()


def open_checkpoint(storage: Storage, url: str, *, stem: str = "model", what: str = "checkpoint") -> CheckpointIndex:
    """Index a safetensors checkpoint directory from headers only.

    Args:
        storage: where to read.
        url: the directory (local path or fsspec URL).
        stem: file stem: ``model`` for weights, ``fisher`` for statistics.
        what: how to name the input in messages (e.g. ``"model 2"``).

    Returns:
        The index.

    Raises:
        ValueError: directory missing, no safetensors, pickle-only weights, a bad index
            or header, or a shard name that would escape the directory.
    """
    where = display_url(url)
    index_url = join(url, f"{stem}.safetensors.index.json")
    try:
        names = storage.listdir(url)
    except Exception as e:  # noqa: BLE001 - first contact with a foreign filesystem library
        # fsspec backends raise their own types for an unreachable endpoint (botocore's
        # EndpointConnectionError is no OSError); any failure here means bad input
        raise ValueError(f"{what} {where}: cannot reach it ({e.__class__.__name__}: {e})") from None
    if f"{stem}.safetensors.index.json" in names:
        try:
            index = json.loads(storage.read_bytes(index_url))
        except (json.JSONDecodeError, UnicodeDecodeError):
            index = None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{display_url(index_url)}: not a valid safetensors index (needs a 'weight_map' object)")
        shard_names = list(dict.fromkeys(weight_map.values()))
    elif f"{stem}.safetensors" in names:
        weight_map = {}
        shard_names = [f"{stem}.safetensors"]
    else:
        if not names and not storage.isdir(url):
            raise ValueError(f"{what} {where}: no such directory")
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ValueError(
                f"{what} {where}: only pickled weights ({pickles[0]}) found; they can run code when "
                f"loaded and are refused. Convert to safetensors first."
            )
        raise ValueError(f"{what} {where}: no {stem}.safetensors or {stem}.safetensors.index.json")

    shard_urls = [join(url, s) for s in shard_names]  # join() refuses names escaping url
    with ThreadPoolExecutor(max_workers=min(16, len(shard_urls))) as pool:
        headers = list(pool.map(lambda u: read_header(storage, u), shard_urls))

    tensors: dict[str, TensorRef] = {}
    files: dict[str, tuple[int, str]] = {}
    metadata: dict[str, str] = {}
    for shard, shard_url, (infos, meta, size, header_sha) in zip(shard_names, shard_urls, headers, strict=True):
        files[shard] = (size, header_sha)
        metadata = metadata or meta
        for name, info in infos.items():
            if name in tensors:
                raise ValueError(f"{where}: tensor '{name}' appears in two shards")
            if weight_map and weight_map.get(name) != shard:
                raise ValueError(
                    f"{display_url(shard_url)}: holds tensor '{name}' which the index maps to {weight_map.get(name)!r}"
                )
            tensors[name] = TensorRef(file=shard_url, info=info)
    missing = [n for n in weight_map if n not in tensors]
    if missing:
        raise ValueError(
            f"{display_url(join(url, weight_map[missing[0]]))}: tensor '{missing[0]}' listed in the index is not in the file"
        )
    if weight_map:  # keep the index's order (usually layer order)
        tensors = {n: tensors[n] for n in weight_map}
    return CheckpointIndex(url=url, tensors=tensors, files=files, metadata=metadata)


def read_json(storage: Storage, url: str, *, strict: bool = True) -> dict[str, Any] | None:
    """A small JSON file (``config.json``...), or None if absent.

    Args:
        strict: raise on a file that is not a JSON object; otherwise return None for it
            (state files of another tool or a torn write are not ours to trust).

    Raises:
        ValueError: if present but not a JSON object (``strict``).
    """
    if not storage.exists(url):
        return None
    try:
        obj = json.loads(storage.read_bytes(url))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if not strict:
            return None
        raise ValueError(f"{display_url(url)}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        if not strict:
            return None
        raise ValueError(f"{display_url(url)}: expected a JSON object")
    return obj
