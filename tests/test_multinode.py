"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`, one CPU
each), both stages submitted through the Jobs API as a user would, work spread over both nodes,
and outputs bit-identical to single-node runs.

Each node runs `ray start ... --block` in its own process group and is stopped by signalling
that group (never a bare `ray stop`, which would kill every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sar_dist.storage import Storage
from sar_dist.synthetic import make_fisher
from tests.conftest import REPO, load_safetensors_dir, run_cli

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes():
    import ray

    ip = ray.util.get_node_ip_address()
    gcs, dash = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: unix socket paths are limited
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "RAY_DISABLE_USAGE_STATS": "1"}
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--block"]
    procs = [subprocess.Popen(
        [RAY, "start", "--head", f"--port={gcs}", f"--node-ip-address={ip}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}", *common],
        cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        client = _wait(lambda: JobSubmissionClient(address), 90, "the head's Jobs API")
        procs.append(subprocess.Popen(
            [RAY, "start", f"--address={ip}:{gcs}", f"--node-ip-address={ip}", *common],
            cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from ray.util.state import list_nodes

        _wait(lambda: len([n for n in list_nodes(address=address) if n.state == "ALIVE"]) == 2 or None, 90,
              "the second node")
        yield client, address
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _wait(probe, timeout: float, what: str):
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        try:
            got = probe()
            if got:
                return got
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(1)
    raise TimeoutError(f"{what} did not come up in {timeout}s ({last})")


def _submit(client, argv: list[str], timeout: float = 400) -> str:
    from ray.job_submission import JobStatus

    entrypoint = f"cd {REPO} && {sys.executable} -m " + " ".join(argv)
    job = client.submit_job(entrypoint=entrypoint)
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, f"{argv[0]}: {status}\n{logs[-3000:]}"
    return logs


def test_both_stages_through_the_jobs_api_on_two_nodes(two_nodes, tiny_models, tmp_path):
    client, address = two_nodes
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w3", "response": f"w{i + 2} w5 w6"}) + "\n"
                            for i in range(6)))
    fisher_args = ["--model", tiny_models["ft1"], "--data", str(data), "--groups", "2", "--cpus-per-rank", "1",
                   "--keep-parts", "--json"]
    multi = tmp_path / "fisher-multi"
    _submit(client, ["pipelines.fisher", *fisher_args, "--output", str(multi)])
    manifest = json.loads((multi / "fisher.json").read_text())
    nodes = {n for part in manifest["parts"] for n in part["nodes"]}
    assert len(nodes) == 2, manifest["parts"]  # one group per node: each node has one CPU

    # the merge: several shards, one CPU each, spread over both nodes
    stats = {k: str(tmp_path / f"stats-{k}") for k in ("ft1", "ft2")}
    for i, k in enumerate(stats):
        make_fisher(Storage(), tiny_models[k], stats[k], seed=i)
    config = tmp_path / "sar.yaml"
    config.write_text(json.dumps({
        "merge_method": "sar", "base_model": tiny_models["base"], "dtype": "float32", "out_shard_size": 20_000,
        "models": [{"model": tiny_models[k], "fisher": stats[k]} for k in stats],
        "parameters": {"density": 0.5},
    }))
    merged_multi = tmp_path / "merged-multi"
    _submit(client, ["pipelines.merge", str(config), "--output", str(merged_multi), "--json"])
    from ray.util.state import list_tasks

    tasks = [t for t in list_tasks(address=address, limit=10_000, detail=True) if (t.name or "").startswith("sar-dist:")]
    assert len({t.node_id for t in tasks if t.node_id}) == 2, [(t.name, t.node_id) for t in tasks]

    # single-node runs of the same commands give the same bytes
    single = tmp_path / "fisher-single"
    r = run_cli("fisher", *fisher_args, "--output", str(single), "--num-cpus", "2", timeout=400)
    assert r.returncode == 0, r.stderr
    assert json.loads((single / "fisher.json").read_text())["shards"] == manifest["shards"]
    merged_single = tmp_path / "merged-single"
    r = run_cli("merge", str(config), "--output", str(merged_single), "--executor", "local")
    assert r.returncode == 0, r.stderr
    a, b = load_safetensors_dir(merged_multi), load_safetensors_dir(merged_single)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
