"""``stats_dtype: bfloat16``: the Fisher stage sums in float32 and commits the sums rounded to
bfloat16 (round to nearest even), exactly the float32 run's statistics rounded; ``fisher.json``
records it; a rerun with another ``stats_dtype`` reuses the float32 parts; a SAR merge reads
bfloat16 statistics; bad values exit 2 with one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from sar_dist.checkpoint.index import open_checkpoint
from sar_dist.checkpoint.reader import read_tensor
from sar_dist.cli import main
from sar_dist.config import MergeJob
from sar_dist.execute.run import execute, prepare
from sar_dist.fisher.config import FisherJob
from sar_dist.fisher.plan import build_fisher_plan
from sar_dist.fisher.run import run_fisher
from sar_dist.plan.planner import build_plan
from sar_dist.storage import Storage
from sar_dist.synthetic import LlamaShape, make_base, make_finetune
from tests.conftest import load_safetensors_dir
from tests.test_sar import reference_sar

SHAPE = LlamaShape(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64, vocab=64)
DATA = "".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}", "response": f"w{i + 3} w{2 * i + 1}"}) + "\n"
               for i in range(4))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local) -> dict[str, str]:
    """Two fine-tunes of one base; float32 statistics of each (parts kept), a bfloat16 run of
    ft1 from scratch through the CLI flag, and ft2 rerun as bfloat16 over its float32 parts."""
    root = tmp_path_factory.mktemp("stats-dtype")
    storage = Storage()
    make_base(storage, str(root / "base"), SHAPE, seed=0)
    for i, name in enumerate(("ft1", "ft2")):
        make_finetune(storage, str(root / "base"), str(root / name), seed=i + 1, density=0.3)
    data = root / "data.jsonl"
    data.write_text(DATA)
    paths = {"root": str(root), "base": str(root / "base"), "data": str(data),
             **{k: str(root / k) for k in ("ft1", "ft2")}}
    for name in ("ft1", "ft2"):
        out = str(root / f"{name}-f32")
        run_fisher(build_fisher_plan(FisherJob.from_dict({"model": paths[name], "data": str(data), "output": out,
                                                          "groups": 2, "keep_parts": True})), poll_s=0.5)
        paths[f"{name}-f32"] = out
    # ft1: an independent bfloat16 run, through the CLI flag
    paths["ft1-bf16"] = str(root / "ft1-bf16")
    assert main(["fisher", "--model", paths["ft1"], "--data", str(data), "--output", paths["ft1-bf16"],
                 "--groups", "2", "--stats-dtype", "bfloat16"]) == 0
    # ft2: the same output again as bfloat16; its float32 parts are reused, only the reduce runs
    paths["ft2-bf16"] = str(root / "ft2-bf16")
    shutil.copytree(paths["ft2-f32"], paths["ft2-bf16"])
    events: list[dict] = []
    job = FisherJob.from_dict({"model": paths["ft2"], "data": str(data), "output": paths["ft2-bf16"], "groups": 2,
                               "stats_dtype": "bfloat16"})
    with pytest.raises(ValueError, match="different job"):  # the float32 output is not taken as done
        run_fisher(build_fisher_plan(job))
    run_fisher(build_fisher_plan(job), emit=events.append, force=True, poll_s=0.5)
    paths["ft2-bf16-events"] = json.dumps(events)
    return paths


def _stats(url: str) -> dict[str, torch.Tensor]:
    storage = Storage()
    index = open_checkpoint(storage, url, stem="fisher")
    return {n: read_tensor(storage, r) for n, r in index.tensors.items()}


def _manifest(url: str) -> dict:
    return json.loads(Path(url, "fisher.json").read_text())


@pytest.mark.parametrize("model", ["ft1", "ft2"])
def test_bfloat16_statistics_are_the_float32_ones_rounded(runs, model):
    f32, bf16 = _stats(runs[f"{model}-f32"]), _stats(runs[f"{model}-bf16"])
    assert f32.keys() == bf16.keys()
    rounded_somewhere = False
    for name, t in f32.items():
        assert t.dtype == torch.float32 and bf16[name].dtype == torch.bfloat16, name
        assert torch.equal(bf16[name], t.to(torch.bfloat16)), name  # round to nearest even, nothing else
        rounded_somewhere |= not torch.equal(bf16[name].float(), t)
    assert rounded_somewhere  # float32 sums that bf16 cannot hold: the check can fail
    m32, m16 = _manifest(runs[f"{model}-f32"]), _manifest(runs[f"{model}-bf16"])
    assert m32["stats_dtype"] == "float32" and m16["stats_dtype"] == "bfloat16"
    assert m16["job_id"] != m32["job_id"] and m16["num_examples"] == m32["num_examples"] == 4
    # the recorded norm is that of the stored (rounded) values: what fisher_norm: l2 divides
    n = m16["num_examples"]
    norm16 = math.sqrt(sum(float((t.double() / n).square().sum()) for t in bf16.values()))
    assert m16["l2_norm_mean"] == pytest.approx(norm16, rel=1e-12)
    assert m16["l2_norm_mean"] != m32["l2_norm_mean"]
    index = json.loads(next(Path(runs[f"{model}-bf16"]).glob("*.index.json")).read_text())
    assert index["metadata"]["total_size"] == sum(2 * t.numel() for t in bf16.values())


def test_rerun_with_another_stats_dtype_reuses_the_parts(runs):
    events = json.loads(runs["ft2-bf16-events"])
    start = next(e for e in events if e["event"] == "start")
    assert start["parts_resumed"] == start["parts_total"] == 2
    assert not [e for e in events if e["event"] == "part_done"]
    # a second identical request is already complete
    job = FisherJob.from_dict({"model": runs["ft2"], "data": runs["data"], "output": runs["ft2-bf16"], "groups": 2,
                               "stats_dtype": "bfloat16"})
    got: list[dict] = []
    run_fisher(build_fisher_plan(job), emit=got.append)
    assert [e["event"] for e in got] == ["already_complete"]


def _sar(runs, kind: str, out: str, **params) -> MergeJob:
    return MergeJob.from_dict({
        "merge_method": "sar", "base_model": runs["base"], "output": out, "dtype": "float32", "out_dtype": "float32",
        "models": [{"model": runs[k], "fisher": runs[f"{k}-{kind}"]} for k in ("ft1", "ft2")],
        "parameters": params,
    })


@pytest.mark.parametrize("arbitration", ["sensitivity", "fisher_mean"])
def test_sar_merge_reads_bfloat16_statistics(runs, tmp_path, arbitration):
    plans = {kind: build_plan(_sar(runs, kind, str(tmp_path / kind), arbitration=arbitration))
             for kind in ("f32", "bf16")}
    fisher_bytes = {kind: sum(r.info.nbytes for t in p.tasks for j in t.tensors for r in j.fisher)
                    for kind, p in plans.items()}
    assert fisher_bytes["bf16"] * 2 == fisher_bytes["f32"] > 0
    execute(prepare(plans["bf16"]), executor="local")
    got = load_safetensors_dir(tmp_path / "bf16")
    base = load_safetensors_dir(runs["base"])
    models = [load_safetensors_dir(runs[k]) for k in ("ft1", "ft2")]
    stats = [_stats(runs[f"{k}-bf16"]) for k in ("ft1", "ft2")]
    scale = [1 / m["num_examples"] / m["l2_norm_mean"] for m in (_manifest(runs[f"{k}-bf16"]) for k in ("ft1", "ft2"))]
    overlap = 0
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.post_attention_layernorm.weight"):
        fishers = [s[name].float() * c for s, c in zip(stats, scale, strict=True)]
        ms = [m[name].float() for m in models]
        overlap += int(((ms[0] != base[name].float()) & (ms[1] != base[name].float())).sum())
        want = reference_sar(base[name].float(), ms, fishers, arbitration=arbitration)
        torch.testing.assert_close(got[name].double(), want, rtol=1e-6, atol=1e-7)
    assert overlap > 0  # both models update some entries: the statistics decide them


def test_statistics_of_another_dtype_than_recorded_are_refused(runs, tmp_path, capsys):
    fake = shutil.copytree(runs["ft1-bf16"], tmp_path / "fake")
    manifest = _manifest(str(fake))
    manifest["stats_dtype"] = "float32"
    (fake / "fisher.json").write_text(json.dumps(manifest))
    cfg = _sar(runs, "bf16", str(tmp_path / "out")).to_dict()
    cfg["models"][0]["fisher"] = str(fake)
    path = tmp_path / "sar.yaml"
    path.write_text(json.dumps(cfg))
    assert main(["merge", str(path), "--executor", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is BF16; fisher.json says F32" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["flag", "config"])
def test_bad_stats_dtype_exits_2_with_one_line(tmp_path, how, capsys):
    model = tmp_path / "model"
    make_base(Storage(), str(model), SHAPE, seed=0)
    data = tmp_path / "data.jsonl"
    data.write_text(DATA)
    out = tmp_path / "out"
    if how == "flag":
        argv = ["fisher", "--model", str(model), "--data", str(data), "--output", str(out), "--stats-dtype", "float16"]
    else:
        cfg = tmp_path / "fisher.yaml"
        cfg.write_text(json.dumps({"model": str(model), "data": str(data), "output": str(out), "stats_dtype": "fp8"}))
        argv = ["fisher", str(cfg)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "stats_dtype" in err and "is not one of float32, bfloat16" in err and len(err.splitlines()) == 1, err
    assert not out.exists()
