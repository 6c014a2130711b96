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
from tests.conftest import REPO, load_safetensors_dir, run_cli, upload_tree
from tests.faultproxy import FaultProxy

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwoNodes:
    """A head and a worker node, each `ray start --block` in its own process group."""

    def __init__(self) -> None:
        import ray

        self.ip = ray.util.get_node_ip_address()
        self.gcs, dash = _free_port(), _free_port()
        self.temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: unix socket paths are limited
        self.env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
                    "RAY_DISABLE_USAGE_STATS": "1"}
        self.address = f"http://127.0.0.1:{dash}"
        self.head = self._start("--head", f"--port={self.gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                f"--dashboard-port={dash}", f"--temp-dir={self.temp}")
        self.worker: subprocess.Popen | None = None
        from ray.job_submission import JobSubmissionClient

        self.client = _wait(lambda: JobSubmissionClient(self.address), 90, "the head's Jobs API")

    def _start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [RAY, "start", f"--node-ip-address={self.ip}", "--num-cpus=1", "--object-store-memory=100000000",
             "--block", *args],
            cwd=REPO, env=self.env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.address) if n.state == "ALIVE"]

    def start_worker(self) -> None:
        self.worker = self._start(f"--address={self.ip}:{self.gcs}")
        _wait(lambda: len(self.alive_nodes()) == 2 or None, 90, "the second node")

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        """Signal a node's process group (never a bare `ray stop`) and wait for it."""
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def shutdown(self) -> None:
        for p in (self.worker, self.head):
            if p is not None:
                self.stop(p)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes():
    cluster = TwoNodes()
    try:
        cluster.start_worker()
        yield cluster
    finally:
        cluster.shutdown()


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
    client, address = two_nodes.client, two_nodes.address
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


def test_pipeline_through_the_jobs_api_on_two_nodes(two_nodes, tiny_models, tmp_path):
    """`python -m pipelines.run` submitted as one Ray job: both models' Fisher stages and the merge
    on the two-node cluster, byte-identical to the same pipeline on the embedded local Ray."""
    import yaml

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w3", "response": f"w{i + 2} w5 w6"}) + "\n"
                            for i in range(4)))

    def pipeline(where: Path) -> str:
        path = where / "pipeline.yaml"
        where.mkdir()
        path.write_text(yaml.safe_dump({
            "base_model": tiny_models["base"],
            "models": [{"name": k, "model": tiny_models[k], "data": str(data)} for k in ("ft1", "ft2")],
            "fisher": {"groups": 1, "cpus_per_rank": 1},
            "merge": {"merge_method": "sar", "dtype": "float32", "out_shard_size": 20_000,
                      "parameters": {"density": 0.5}},
            "statistics": str(where / "stats"), "output": str(where / "merged")}))
        return str(path)

    cluster, local = tmp_path / "cluster", tmp_path / "local"
    logs = _submit(two_nodes.client, ["pipelines.run", pipeline(cluster), "--json"])
    events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert {e["model"] for e in events if e.get("stage") == "fisher" and e["event"] == "committed"} == {"ft1", "ft2"}
    r = run_cli("run", pipeline(local), "--num-cpus", "2", timeout=400)
    assert r.returncode == 0, r.stderr
    for k in ("ft1", "ft2"):
        a = json.loads((cluster / "stats" / k / "fisher.json").read_text())
        assert a["shards"] == json.loads((local / "stats" / k / "fisher.json").read_text())["shards"], k
    a, b = load_safetensors_dir(cluster / "merged"), load_safetensors_dir(local / "merged")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    shards = sorted(p.name for p in (cluster / "merged").glob("*.safetensors"))
    assert len(shards) > 1 and all((cluster / "merged" / n).read_bytes() == (local / "merged" / n).read_bytes()
                                   for n in shards)


def test_node_stopped_mid_merge_the_job_completes_on_the_other(two_nodes, tiny_models, s3_server, s3_options, tmp_path):
    """SIGKILL the worker node's process group while a shard task runs there: Ray retries the
    task on the head, the merge commits, its bytes equal a single-node run, nothing partial is
    left. Inputs are read from S3 through a proxy that adds latency to each ranged read, so a
    shard task takes seconds, not milliseconds. Runs last: the module's worker node stays down."""
    from ray.util.state import list_tasks

    storage = Storage(s3_options)
    storage._remote("s3://x")[0].mkdir("nodestop")
    for k in ("base", "ft1", "ft2", "ft3"):
        upload_tree(storage, tiny_models[k], f"s3://nodestop/{k}")

    def config(endpoint: str) -> Path:
        path = tmp_path / f"ties-{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(json.dumps({
            "merge_method": "ties", "base_model": "s3://nodestop/base", "out_shard_size": 20_000,
            "models": [{"model": f"s3://nodestop/{k}"} for k in ("ft1", "ft2", "ft3")],
            "parameters": {"density": 0.3, "weight": 1.0},
            "storage_options": {"client_kwargs": {"endpoint_url": endpoint}}}))
        return path

    ref, out = tmp_path / "ref", tmp_path / "out"
    r = run_cli("merge", str(config(s3_server)), "--output", str(ref), "--executor", "local")
    assert r.returncode == 0, r.stderr

    head_id = next(n.node_id for n in two_nodes.alive_nodes() if n.is_head_node)
    # one request at a time, 0.5 s each: a shard task runs for several seconds, far longer than
    # the state API takes to report it running
    with FaultProxy(s3_server, delay_s=0.5) as proxy:
        driver = subprocess.Popen(
            [sys.executable, "-m", "sar_dist.cli", "merge", str(config(proxy.url)), "--output", str(out), "--json",
             "--read-concurrency", "1", "--ray-address", f"{two_nodes.ip}:{two_nodes.gcs}"],
            cwd=REPO, env=two_nodes.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # wait until a shard task is running on the worker node, then take the node away
            deadline, victim = time.time() + 120, None
            while victim is None and time.time() < deadline and driver.poll() is None:
                running = list_tasks(address=two_nodes.address, filters=[("state", "=", "RUNNING")], detail=True)
                victim = next((t for t in running if (t.name or "").startswith("sar-dist:") and t.node_id
                               and t.node_id != head_id), None)
                time.sleep(0.2)
            assert victim is not None, "no shard task ran on the worker node"
            two_nodes.stop(two_nodes.worker, signal.SIGKILL)
            stdout, stderr = driver.communicate(timeout=400)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    assert driver.returncode == 0, stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["event"] == "committed"
    a, b = load_safetensors_dir(out), load_safetensors_dir(ref)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    attempts = [t for t in list_tasks(address=two_nodes.address, limit=10_000, detail=True) if t.name == victim.name]
    assert max(t.attempt_number for t in attempts) >= 1, [(t.attempt_number, t.state) for t in attempts]
