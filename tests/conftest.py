"""Shared fixtures: tiny Llama-shaped checkpoints, a loopback S3 server, a local Ray.

Everything is built on the fly: no downloads, no GPU. Ray and the S3 server are real
(a local Ray instance; moto's S3 API server on 127.0.0.1 reached through s3fs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# the same auth mode for every Ray process the tests start (mixing modes breaks joins)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
# dummy credentials for the loopback S3 server, set before any Ray worker starts (workers
# inherit the environment Ray was started with); real credentials never reach the tests
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
for _var in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
    os.environ.pop(_var, None)

from sar_dist.storage import Storage  # noqa: E402
from sar_dist.synthetic import LlamaShape, make_base, make_finetune  # noqa: E402

TINY = LlamaShape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=128)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """A bf16 base (2 shards) and three RLVR-like fine-tunes (sparse, partly overlapping)."""
    root = tmp_path_factory.mktemp("tiny")
    storage = Storage()
    paths = {"base": str(root / "base")}
    make_base(storage, paths["base"], TINY, seed=0, max_shard_bytes=40_000)
    regions = {"ft1": (0.0, 0.6), "ft2": (0.4, 1.0), "ft3": (0.0, 1.0)}
    for i, (name, region) in enumerate(regions.items()):
        paths[name] = str(root / name)
        make_finetune(storage, paths["base"], paths[name], seed=i + 1, density=0.05, region=region,
                      max_shard_bytes=30_000)
    return paths


def write_config(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``sar-dist`` as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "sar_dist.cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO,
    )


def tree_bytes(root: str | Path) -> dict[str, bytes]:
    """Every file under a directory (relative name -> bytes), hidden state excluded."""
    root = Path(root)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".sar_dist" not in p.parts
    }


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API server on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_options(s3_server) -> dict:
    return {"client_kwargs": {"endpoint_url": s3_server}}


def upload_tree(storage: Storage, local: str, url: str) -> None:
    """Copy a local checkpoint directory to any URL."""
    for p in sorted(Path(local).iterdir()):
        if p.is_file():
            storage.write_bytes(f"{url}/{p.name}", p.read_bytes())


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for a test module (2 CPUs, small object store, no dashboard)."""
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=10**8, include_dashboard=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


def load_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a local checkpoint directory (for comparisons in tests)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for p in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


def copytree(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst
