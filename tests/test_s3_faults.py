"""Object storage that fails: a fault-injecting proxy in front of the loopback S3 server. Transient
503s and dropped connections are retried and the merge comes out identical; a permanently broken
object ends the run with exit 1, a message naming the object, and no output that looks complete."""

from __future__ import annotations

import json

import pytest
import yaml

from sar_dist.storage import Storage
from tests.conftest import run_cli, upload_tree
from tests.faultproxy import FaultProxy


def _setup(storage: Storage, tiny_models, bucket: str) -> None:
    fs = storage._remote("s3://x")[0]
    fs.mkdir(bucket)
    for k in ("base", "ft1", "ft2"):
        upload_tree(storage, tiny_models[k], f"s3://{bucket}/{k}")


def _config(tmp_path, bucket: str, endpoint: str, out: str):
    cfg = {"merge_method": "ties", "base_model": f"s3://{bucket}/base", "dtype": "float32",
           "models": [{"model": f"s3://{bucket}/{k}", "parameters": {"weight": 1.0, "density": 0.5}}
                      for k in ("ft1", "ft2")],
           "output": out, "out_shard_size": 30_000,
           "storage_options": {"client_kwargs": {"endpoint_url": endpoint}}}
    path = tmp_path / f"{out.rsplit('/', 1)[-1]}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def clean_merge(tmp_path_factory, tiny_models, s3_server, s3_options) -> list[tuple[str, str]]:
    """The fault-free merge of bucket ``faults``: its shards' (file, sha256)."""
    storage = Storage(s3_options)
    _setup(storage, tiny_models, "faults")
    r = run_cli("merge", _config(tmp_path_factory.mktemp("clean"), "faults", s3_server, "s3://faults/clean"),
                "--executor", "local")
    assert r.returncode == 0, r.stderr
    return _shards(storage, "faults/clean")


def _shards(storage: Storage, path: str) -> list[tuple[str, str]]:
    manifest = json.loads(storage._remote("s3://x")[0].cat_file(f"{path}/sar_merge.json"))
    return [(s["file"], s["sha256"]) for s in manifest["shards"]]


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_transient_faults_are_retried_and_output_is_identical(tmp_path, clean_merge, s3_server, s3_options, executor):
    # the Ray executor's tasks read and write through the proxy from their own worker processes
    with FaultProxy(s3_server, fail_every=4, drop_every=7) as proxy:
        r = run_cli("merge", _config(tmp_path, "faults", proxy.url, f"s3://faults/faulty-{executor}"),
                    "--executor", executor, "--num-cpus", "2")
        assert r.returncode == 0, r.stderr
        assert proxy.failed > 0 and proxy.dropped > 0
    assert _shards(Storage(s3_options), f"faults/faulty-{executor}") == clean_merge


def test_permanent_failure_names_the_object_and_leaves_no_complete_output(tmp_path, tiny_models, s3_server, s3_options):
    storage = Storage(s3_options)
    _setup(storage, tiny_models, "broken")
    shard = sorted(p.rsplit("/", 1)[-1] for p in storage._remote("s3://x")[0].ls("broken/ft2")
                   if p.endswith(".safetensors"))[-1]
    # broken from the start: planning cannot read its header, bad input (exit 2), named
    with FaultProxy(s3_server, always_fail=f"/broken/ft2/{shard}") as proxy:
        r = run_cli("merge", _config(tmp_path, "broken", proxy.url, "s3://broken/out"), "--executor", "local")
    assert r.returncode == 2 and f"s3://broken/ft2/{shard}" in r.stderr, r.stderr
    assert not storage.exists("s3://broken/out/sar_merge.json")
    # breaks during the merge: the run fails (exit 1), names the object, looks incomplete
    with FaultProxy(s3_server, always_fail=f"/broken/ft2/{shard}", data_only=True) as proxy:
        r = run_cli("merge", _config(tmp_path, "broken", proxy.url, "s3://broken/out"), "--executor", "local",
                    timeout=600)
    assert r.returncode == 1 and f"s3://broken/ft2/{shard}" in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # progress lines come first
    assert last.startswith("sar-dist: failed: OSError") and f"s3://broken/ft2/{shard}" in last, r.stderr
    assert not storage.exists("s3://broken/out/sar_merge.json")
