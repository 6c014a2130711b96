"""Before a run: check the output; after it: commit index, configs and manifest.

The manifest ``sar_merge.json`` is written last: its presence means the output is
complete. Until then finished shards are known by their receipts under ``.sar_dist/``,
which carry the plan id, so a rerun of the same plan resumes and a different plan
never trusts them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import posixpath
import time
from collections.abc import Iterable
from importlib import metadata as importlib_metadata
from typing import Any

from sar_dist.output import Lease, remove_state
from sar_dist.plan.planner import COPIED_FILES, MANIFEST_NAME, STATE_DIR, TOKENIZER_FILES
from sar_dist.plan.types import Plan, ShardResult
from sar_dist.storage import Storage, display_url, join, redact_obj

logger = logging.getLogger(__name__)
MANIFEST_VERSION = 2
"""2: the manifest lists every file the merge wrote ("files"); 1 listed only its shards."""
INDEX_NAME = "model.safetensors.index.json"
_VERSIONED = ("sar-dist", "torch", "safetensors", "fsspec", "s3fs", "ray", "transformers", "deepspeed")


def read_manifest(storage: Storage, output: str) -> dict[str, Any] | None:
    """The output's manifest, or None if the output is not a complete merge."""
    url = join(output, MANIFEST_NAME)
    if not storage.exists(url):
        return None
    try:
        obj = json.loads(storage.read_bytes(url))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{display_url(url)}: corrupt manifest") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{display_url(url)}: corrupt manifest")
    return obj


def planned_files(plan: Plan) -> list[str]:
    """Every name the merge writes at the top of its output, the manifest last."""
    names = [t.file_name for t in plan.tasks]
    if len(plan.tasks) > 1:
        names.append(INDEX_NAME)
    if plan.config_json is not None:
        names.append("config.json")
    names += [name for _, name in plan.copy_files]
    return [*names, MANIFEST_NAME]


def manifest_files(manifest: dict[str, Any] | None) -> set[str]:
    """The names a complete merge wrote (its manifest's own record)."""
    if manifest is None:
        return set()
    files = manifest.get("files")
    if isinstance(files, list):
        return {f for f in files if isinstance(f, str)}
    # version 1 listed only shards: the other names are the ones every merge writes
    shards = {s.get("file") for s in manifest.get("shards", []) if isinstance(s, dict)}
    return {f for f in shards if isinstance(f, str)} | {INDEX_NAME, "config.json", MANIFEST_NAME,
                                                         *COPIED_FILES, *TOKENIZER_FILES}


def check_output(plan: Plan, manifest: dict[str, Any] | None, *, force: bool) -> bool:
    """Decide what to do with an earlier complete merge at the output, before anything is written.

    Returns:
        True if the output already holds this exact merge (nothing to do).

    Raises:
        ValueError: it holds a different complete merge and ``force`` is off.
    """
    if manifest is None:
        return False
    if manifest.get("plan_id") == plan.plan_id:
        return True
    if not force:
        raise ValueError(
            f"{display_url(plan.output)}: already holds a different complete merge "
            f"(plan {str(manifest.get('plan_id'))[:12]}); choose another output or pass --force"
        )
    return False


def clear_previous(storage: Storage, plan: Plan) -> None:
    """With --force: retire a different merge at the output, manifest first.

    Only files the old manifest lists are removed (those the new merge does not rewrite).
    """
    manifest = read_manifest(storage, plan.output)
    if manifest is None or manifest.get("plan_id") == plan.plan_id:
        return
    storage.remove(join(plan.output, MANIFEST_NAME))  # no longer looks complete
    keep = set(planned_files(plan))
    listed = manifest.get("files")
    for name in sorted(manifest_files(manifest) - keep):
        # a version-1 manifest names only its shards; other names are left unless ours now
        if isinstance(listed, list) or name.endswith(".safetensors") or name == INDEX_NAME:
            storage.remove(join(plan.output, name))


def finished_shards(storage: Storage, plan: Plan) -> dict[int, ShardResult]:
    """Shards of this plan already written by an earlier run (receipt + file size agree)."""
    done: dict[int, ShardResult] = {}
    names = set(storage.listdir(join(plan.output, STATE_DIR)))
    for task in plan.tasks:
        if f"{task.file_name}.json" not in names:
            continue
        try:
            result = ShardResult.from_dict(json.loads(storage.read_bytes(task.receipt_url)))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError):
            continue  # an unreadable receipt: redo the shard
        if result.plan_id != plan.plan_id or not storage.exists(task.url):
            continue
        if storage.size(task.url) != result.bytes or result.bytes != task.out_bytes:
            continue
        done[task.index] = result
    return done


def package_versions() -> dict[str, str]:
    """Python and the installed versions of the packages a result depends on (manifests)."""
    out = {"python": platform.python_version()}
    for pkg in _VERSIONED:
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def commit(storage: Storage, plan: Plan, results: Iterable[ShardResult], *, started: float,
           lease: Lease | None = None) -> dict[str, Any]:
    """Write the index, config and tokenizer files, then the manifest (last).

    Args:
        storage: output storage.
        plan: the plan that ran.
        results: one per shard task.
        started: wall-clock start (time.time()) for the manifest.
        lease: the run's lease on the output, checked just before the manifest is written.

    Returns:
        The manifest.
    """
    by_index = {r.index: r for r in results}
    assert sorted(by_index) == list(range(len(plan.tasks))), "commit needs every shard"
    out = plan.output
    if len(plan.tasks) > 1:
        weight_map = {name: plan.tasks[r.index].file_name for r in by_index.values() for name in r.tensors}
        index = {
            "metadata": {"total_size": sum(j.out_bytes for t in plan.tasks for j in t.tensors)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        storage.write_bytes(join(out, INDEX_NAME), json.dumps(index, indent=2).encode())
    if plan.config_json is not None:
        storage.write_bytes(join(out, "config.json"), json.dumps(plan.config_json, indent=2).encode())
    for src, name in plan.copy_files:
        storage.write_bytes(join(out, name), storage.read_bytes(src))
    manifest = {
        "format": "sar-dist-merge",
        "version": MANIFEST_VERSION,
        "plan_id": plan.plan_id,
        "config": redact_obj(plan.job),
        "inputs": redact_obj(plan.inputs),
        **({"statistics": list(plan.statistics)} if plan.statistics else {}),
        "files": planned_files(plan),
        "versions": package_versions(),
        "started": started,
        "finished": time.time(),
        "shards": [
            {
                "file": r.file_name,
                "bytes": r.bytes,
                "sha256": r.sha256,
                "tensors": list(r.tensors),
            }
            for r in (by_index[i] for i in range(len(plan.tasks)))
        ],
    }
    # writers killed mid-shard (driver or node lost) left temporary files that no one else removes
    storage.remove_partials(out, [t.file_name for t in plan.tasks])
    if lease is not None:
        lease.check()  # a run that lost its lease must not declare the output complete
    storage.write_bytes(join(out, MANIFEST_NAME), json.dumps(manifest, indent=2).encode())
    # receipts are now in the manifest; only this run's own state files go, by name
    remove_state(storage, out, [posixpath.basename(t.receipt_url) for t in plan.tasks])
    return manifest


VERIFY_BLOCK_BYTES = 64 * 2**20


def verify_output(storage: Storage, output: str) -> list[str]:
    """Check every shard listed in the manifest against its size and sha256.

    Args:
        storage: where the output is.
        output: output directory URL.

    Returns:
        Problems found ([] when every shard matches).

    Raises:
        ValueError: no manifest (not a complete merge).
    """
    manifest = read_manifest(storage, output)
    if manifest is None:
        raise ValueError(f"{display_url(output)}: no {MANIFEST_NAME}: not a complete sar-dist merge")
    problems = []
    for shard in manifest.get("shards", []):
        url = join(output, shard["file"])
        if not storage.exists(url):
            problems.append(f"{display_url(url)}: missing")
            continue
        size = storage.size(url)
        if size != shard["bytes"]:
            problems.append(f"{display_url(url)}: {size} bytes, manifest says {shard['bytes']}")
            continue
        h = hashlib.sha256()
        for start in range(0, size, VERIFY_BLOCK_BYTES):
            h.update(storage.read_range(url, start, min(size, start + VERIFY_BLOCK_BYTES)))
        if h.hexdigest() != shard["sha256"]:
            problems.append(f"{display_url(url)}: sha256 {h.hexdigest()[:16]}..., manifest says {shard['sha256'][:16]}...")
    return problems
