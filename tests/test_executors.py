"""Local and Ray executors: byte-identical outputs, resume, and a real S3 API."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from sar_dist.config import MergeJob
from sar_dist.execute.run import execute, prepare
from sar_dist.plan.planner import build_plan
from sar_dist.storage import Storage
from tests.conftest import load_safetensors_dir, tree_bytes, upload_tree

METHOD_CONFIGS = {
    "ties": {"parameters": {"density": 0.5, "weight": 1.0}},
    "dare_ties": {"parameters": {"density": 0.6, "weight": 0.8}},
    "della": {"parameters": {"density": 0.5, "epsilon": 0.1, "weight": 1.0}},
    "ram": {"parameters": {}},
    "task_arithmetic": {"parameters": {"weight": 0.5}},
}


def _job(models: dict[str, str], out: str, method: str = "ties", **extra) -> MergeJob:
    d = {
        "merge_method": method,
        "base_model": models["base"],
        "models": [{"model": models[k]} for k in ("ft1", "ft2", "ft3")],
        "output": out,
        "seed": 7,
        **METHOD_CONFIGS.get(method, {}),
        **extra,
    }
    return MergeJob.from_dict(d, where="test")


def _run(job: MergeJob, executor: str, budget: int = 2**30, **kw) -> dict:
    plan = build_plan(job, memory_budget=budget)
    return execute(prepare(plan), executor=executor, **kw)


def _shard_files(out: str) -> dict[str, bytes]:
    return {k: v for k, v in tree_bytes(out).items() if k.endswith(".safetensors") or k.endswith("index.json")}


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_local_and_ray_write_identical_bytes(tmp_path, tiny_models, ray_local, method):
    local_out, ray_out = str(tmp_path / "local"), str(tmp_path / "ray")
    _run(_job(tiny_models, local_out, method, out_shard_size=20_000), "local")
    events = []
    _run(_job(tiny_models, ray_out, method, out_shard_size=20_000), "ray", emit=events.append)
    local_files, ray_files = _shard_files(local_out), _shard_files(ray_out)
    assert len(local_files) > 3 and local_files == ray_files
    done = [e for e in events if e["event"] == "shard_done"]
    assert len(done) == len(local_files) - 1 and events[-1]["event"] == "committed"
    assert done[-1]["shards_done"] == done[-1]["shards_total"] and "eta_s" in done[-1]


@pytest.mark.parametrize("method, params, dtype", [
    ("dare_ties", {"density": 0.5, "weight": 1.0, "rescale": False}, None),
    ("task_arithmetic", {"weight": 0.7}, "bfloat16"),
    ("ties", {"density": 0.02, "weight": 1.0, "rescale": True}, None),  # exact threshold in passes
    ("ties", {"density": 0.02, "weight": 1.0}, "bfloat16"),
    ("ties", {"density": 0.5, "weight": 1.0}, None),  # every nonzero delta kept: no threshold pass
    ("dare_ties", {"density": 0.5, "weight": 1.0}, None),  # L1 rescale norms in a pass
    ("dare_linear", {"density": 0.3, "weight": 0.8}, "bfloat16"),
])
def test_chunked_equals_whole(tmp_path, tiny_models, method, params, dtype):
    whole, chunked = str(tmp_path / "whole"), str(tmp_path / "chunked")
    extra = {"dtype": dtype} if dtype else {}
    job = lambda out: _job(tiny_models, out, method, parameters=params, **extra)  # noqa: E731
    plan = build_plan(job(chunked), memory_budget=6_000)
    assert not plan.warnings
    assert sum(j.chunk_rows < j.shape[0] for t in plan.tasks for j in t.tensors if j.shape) >= 15
    execute(prepare(plan), executor="local")
    _run(job(whole), "local")
    assert _shard_files(whole) == _shard_files(chunked)


def test_ray_resume_after_failed_shard(tmp_path, tiny_models, ray_local):
    ref = str(tmp_path / "ref")
    _run(_job(tiny_models, ref, out_shard_size=20_000), "local")
    out = tmp_path / "out"
    job = _job(tiny_models, str(out), out_shard_size=20_000)
    plan = build_plan(job)
    prepared = prepare(plan)
    # make one shard's destination unwritable: a non-empty directory where the file goes (made
    # after prepare, which refuses an output holding files sar-dist did not write)
    blocker = out / plan.tasks[2].file_name
    (blocker / "x").mkdir(parents=True)
    with pytest.raises(OSError):
        execute(prepared, executor="ray")
    assert not (out / "sar_merge.json").exists()
    receipts = [n for n in os.listdir(out / ".sar_dist") if n.endswith(".safetensors.json")]
    assert 0 < len(receipts) < len(plan.tasks)
    (blocker / "x").rmdir()
    blocker.rmdir()
    events = []
    execute(prepare(build_plan(job)), executor="ray", emit=events.append)
    start = next(e for e in events if e["event"] == "start")
    assert start["resumed_shards"] >= 1 and start["todo_shards"] < len(plan.tasks)
    assert _shard_files(str(out)) == _shard_files(ref)


def test_s3_roundtrip_on_loopback(tmp_path, tiny_models, s3_options, ray_local):
    storage = Storage(s3_options)
    fs = storage._remote("s3://x")[0]
    fs.mkdir("sar-models")
    remote = {}
    for k in ("base", "ft1", "ft2", "ft3"):
        remote[k] = f"s3://sar-models/{k}"
        upload_tree(storage, tiny_models[k], remote[k])
    local_out = str(tmp_path / "local")
    _run(_job(tiny_models, local_out, out_shard_size=20_000), "local")
    job = _job(remote, "s3://sar-models/merged", out_shard_size=20_000, storage_options=s3_options)
    manifest = _run(job, "ray")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("sar-models/merged"))
    assert "sar_merge.json" in names and ".sar_dist" not in names
    for shard in manifest["shards"]:
        remote_bytes = fs.cat_file(f"sar-models/merged/{shard['file']}")
        assert remote_bytes == Path(local_out, shard["file"]).read_bytes()
    assert json.loads(fs.cat_file("sar-models/merged/sar_merge.json"))["plan_id"] == manifest["plan_id"]
    assert "secret" not in json.dumps(manifest).lower()


def test_merged_model_loads_with_transformers(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "out")
    _run(_job(tiny_models, out, tokenizer_source="base", out_dtype="float32"), "local")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.float32
    merged = load_safetensors_dir(out)
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), merged["model.embed_tokens.weight"])
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()


def test_ray_worker_killed_mid_shard_is_retried(tmp_path, ray_local):
    """SIGKILL the worker process running a shard task: Ray retries it, the output is identical."""
    import signal
    import threading

    import psutil

    from sar_dist.synthetic import LlamaShape, make_base, make_finetune

    storage = Storage()
    shape = LlamaShape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024, vocab=2048)
    models = {"base": str(tmp_path / "base")}
    make_base(storage, models["base"], shape, tokenizer=False)
    for i, k in enumerate(("ft1", "ft2", "ft3")):
        models[k] = str(tmp_path / k)
        make_finetune(storage, models["base"], models[k], seed=i + 1, density=0.05)
    params = {"parameters": {"density": 0.02, "weight": 1.0, "rescale": True}}
    ref = str(tmp_path / "ref")
    _run(_job(models, ref, "ties", out_shard_size=2_000_000, **params), "local")

    killed: list[str] = []
    done = threading.Event()

    def killer() -> None:
        while not done.is_set() and len(killed) < 2:
            for p in psutil.process_iter(["pid", "cmdline"]):
                title = " ".join(p.info["cmdline"] or [])
                if title.startswith("ray::sar-dist:model-"):
                    try:
                        p.send_signal(signal.SIGKILL)
                        killed.append(title)
                    except psutil.NoSuchProcess:
                        pass
                    done.wait(0.3)
                    break
            done.wait(0.005)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        out = str(tmp_path / "out")
        _run(_job(models, out, "ties", out_shard_size=2_000_000, **params), "ray")
    finally:
        done.set()
        thread.join()
    assert killed, "no shard task was running to kill"
    assert _shard_files(out) == _shard_files(ref)


def test_task_memory_request_counts_state_and_parts_in_flight(tmp_path, tiny_models):
    from sar_dist.merge.registry import get_method
    from sar_dist.plan.planner import state_bytes
    from sar_dist.storage import READ_PART_BYTES

    ta = build_plan(_job(tiny_models, str(tmp_path / "ta"), "task_arithmetic", out_shard_size=20_000))
    ties = build_plan(_job(tiny_models, str(tmp_path / "ties"), "ties", out_shard_size=20_000))
    assert [t.file_name for t in ta.tasks] == [t.file_name for t in ties.tasks]
    for a, b in zip(ta.tasks, ties.tasks, strict=True):
        held = max(state_bytes(j, get_method("ties")) for j in b.tensors)
        # kept magnitudes (all of a tensor this small, fp32) and two float64 norms per row, per model
        assert held == max(3 * (j.shape[0] * 16 + math.prod(j.shape) * 4) for j in b.tensors if j.params)
        assert b.estimated_bytes - a.estimated_bytes == held > 0
    # remote inputs: the parts in flight are requested too
    storage = Storage()
    remote = {k: f"memory://mem-{tmp_path.name}/{k}" for k in tiny_models}
    for k, local in tiny_models.items():
        upload_tree(storage, local, remote[k])
    ta_remote = build_plan(_job(remote, str(tmp_path / "ta-remote"), "task_arithmetic", out_shard_size=20_000),
                           read_concurrency=4)
    assert [t.estimated_bytes - a.estimated_bytes for t, a in zip(ta_remote.tasks, ta.tasks, strict=True)] == \
        [4 * READ_PART_BYTES] * len(ta.tasks)
