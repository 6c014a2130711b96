"""The driver killed with SIGKILL mid-run, then the same command again: the rerun resumes from
the finished shards (merge) or parts (Fisher) and its output is bit-identical to a run that was
never interrupted.

The driver is the `sar-dist` CLI with its default executor, so it starts the local Ray itself
(the laptop case) and its Ray processes die with it. Every process it started is recorded
before the kill and, if still alive when the test ends, stopped by its own pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from sar_dist.storage import Storage
from sar_dist.synthetic import LlamaShape, make_base
from tests.conftest import REPO, tree_bytes, write_config

SHAPE = LlamaShape(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64, vocab=64)


class Driver:
    """A `sar-dist` command in its own session, printing JSON events."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sar_dist.cli", *args, "--json"], cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.started: list[psutil.Process] = []

    def events(self) -> Iterator[dict]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                yield json.loads(line)

    def kill(self) -> None:
        """SIGKILL the driver alone (as an OOM killer or a preempted pod would)."""
        self.started = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def reap(self, timeout: float = 3) -> None:
        """Wait for what the driver started to exit; stop stragglers by pid."""
        gone, alive = psutil.wait_procs(self.started, timeout=timeout)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=10)


def _run_to_completion(*args: str) -> list[dict]:
    d = Driver(*args)
    events = list(d.events())
    assert d.proc.wait(timeout=300) == 0, events[-3:]
    return events


def _kill_after(event: str, *args: str) -> Driver:
    d = Driver(*args)
    for e in d.events():
        if e["event"] == event:
            d.kill()
            return d
    raise AssertionError(f"the run ended (exit {d.proc.wait()}) before any {event!r} event")


def _files(root: str) -> dict[str, bytes]:
    """Every file of an output, manifests' timings aside."""
    out = {}
    for name, data in tree_bytes(root).items():
        if name.endswith((".safetensors", ".json")) and not name.endswith(("sar_merge.json", "fisher.json")):
            out[name] = data
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    from sar_dist.synthetic import make_finetune

    root = tmp_path_factory.mktemp("driver-kill")
    storage = Storage()
    paths = {"base": str(root / "base")}
    make_base(storage, paths["base"], SHAPE, seed=0)
    for i in range(2):
        paths[f"ft{i}"] = str(root / f"ft{i}")
        make_finetune(storage, paths["base"], paths[f"ft{i}"], seed=i + 1, density=0.05)
    return paths


def test_merge_driver_killed_then_rerun_resumes_bit_identical(tmp_path, models):
    config = write_config(tmp_path / "ties.yaml", f"""
merge_method: ties
base_model: {models['base']}
models:
  - model: {models['ft0']}
  - model: {models['ft1']}
parameters: {{density: 0.5, weight: 1.0}}
out_shard_size: 4000
""")
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    _run_to_completion("merge", config, "--output", ref, "--executor", "local")

    d = _kill_after("shard_done", "merge", config, "--output", out, "--num-cpus", "1")
    try:
        receipts = [n for n in os.listdir(Path(out) / ".sar_dist") if n.endswith(".safetensors.json")]
        total = len([n for n in _files(ref) if n.endswith(".safetensors")])
        assert 1 <= len(receipts) < total, (receipts, total)
        assert not (Path(out) / "sar_merge.json").exists()

        events = _run_to_completion("merge", config, "--output", out, "--num-cpus", "1")
    finally:
        d.reap()
    start = next(e for e in events if e["event"] == "start")
    assert start["resumed_shards"] >= len(receipts) and start["todo_shards"] == total - start["resumed_shards"]
    assert _files(out) == _files(ref)
    # nothing of the killed run is left behind (no temporary or partial files)
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))


def test_fisher_driver_killed_then_rerun_resumes_bit_identical(tmp_path, models):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w3", "response": f"w{i + 2} w5"}) + "\n"
                            for i in range(1, 9)))
    args = ["--model", models["base"], "--data", str(data), "--groups", "2", "--num-cpus", "1", "--max-length", "16"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    _run_to_completion("fisher", *args, "--output", ref)

    d = _kill_after("part_done", "fisher", *args, "--output", out)
    try:
        parts = Path(out) / "parts"
        finished = [p for p in parts.iterdir() if (p / "part.json").exists()]
        assert len(finished) == 1, finished
        assert not (Path(out) / "fisher.json").exists()

        events = _run_to_completion("fisher", *args, "--output", out)
    finally:
        d.reap()
    start = next(e for e in events if e["event"] == "start")
    assert start["parts_resumed"] >= len(finished)
    assert _files(out) == _files(ref)
    assert json.loads((Path(out) / "fisher.json").read_text())["num_examples"] == 8
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
