"""NaN and inf stop a merge or a Fisher run (exit 2, one line naming the model and tensor or the
example); nothing at the output looks complete and no input file changes; ``allow_nonfinite: true``
opts out. Real merges and Fisher ranks on tiny checkpoints, a few of them through the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sar_dist.config import MergeJob
from sar_dist.execute.run import execute, prepare
from sar_dist.finite import NonFiniteError, all_finite, check_finite, describe
from sar_dist.fisher.config import FisherJob
from sar_dist.fisher.plan import build_fisher_plan
from sar_dist.fisher.worker import PART_MARKER, run_rank
from sar_dist.plan.planner import MANIFEST_NAME, build_plan
from sar_dist.storage import Storage
from sar_dist.synthetic import LlamaShape, make_base, make_fisher
from tests.conftest import load_safetensors_dir, run_cli, tree_bytes, write_config

POISONED = "model.layers.1.mlp.up_proj.weight"  # [64, 32] in the tiny models: chunked at a 6 kB budget
METHODS = {
    "ties": {"parameters": {"density": 0.5, "weight": 1.0}},
    "linear": {"parameters": {"weight": 0.5}},
    "task_arithmetic": {"parameters": {"weight": 1.0}},
    "sar": {"parameters": {"density": 0.5}},
    "dare_ties": {"parameters": {"density": 0.5, "weight": 1.0}},
}


def error_line(stderr: str) -> str:
    """The one error line, last on stderr (progress lines may come before it), no traceback."""
    lines = stderr.rstrip("\n").splitlines()
    errors = [line for line in lines if line.startswith("sar-dist: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in stderr, stderr
    return errors[0]


def sha256_tree(*dirs: str) -> dict[str, str]:
    """sha256 of every file under the given directories."""
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def poison(src: str, dst: str, tensor: str, values: dict[int, float]) -> str:
    """A copy of checkpoint ``src`` with ``values`` (flat index -> value) written into ``tensor``."""
    shutil.copytree(src, dst)
    for f in sorted(Path(dst).glob("*.safetensors")):
        tensors = load_file(str(f))
        if tensor in tensors:
            flat = tensors[tensor].view(-1)
            for i, v in values.items():
                flat[i] = v
            save_file(tensors, str(f), metadata={"format": "pt"})
            return dst
    raise AssertionError(f"{tensor} not in {src}")


@pytest.fixture(scope="module")
def bad_models(tiny_models, tmp_path_factory) -> dict[str, str]:
    """ft1 with 3 NaN, ft1 with +inf and -inf, ft1 with an entry that is finite in bf16 but not in
    fp16, and Fisher statistics for each model (sar); the clean ft2 and its statistics."""
    root = tmp_path_factory.mktemp("nonfinite")
    out = {
        "nan": poison(tiny_models["ft1"], str(root / "ft-nan"), POISONED, {5: math.nan, 70: math.nan, 900: math.nan}),
        "inf": poison(tiny_models["ft1"], str(root / "ft-inf"), POISONED, {7: math.inf, 1500: -math.inf}),
        "big": poison(tiny_models["ft1"], str(root / "ft-big"), POISONED, {11: 1.0e6}),
    }
    storage = Storage()
    for name in ("nan", "inf", "ft2"):
        model = out.get(name) or tiny_models[name]
        out[f"fisher-{name}"] = str(root / f"fisher-{name}")
        make_fisher(storage, model, out[f"fisher-{name}"], seed=3, num_examples=4)
    out["fisher-ft2-nan"] = str(root / "fisher-ft2-nan")
    shutil.copytree(out["fisher-ft2"], out["fisher-ft2-nan"])
    for f in Path(out["fisher-ft2-nan"]).glob("*.safetensors"):
        tensors = load_file(str(f))
        tensors["model.layers.0.self_attn.q_proj.weight"].view(-1)[3] = math.nan
        save_file(tensors, str(f), metadata={"format": "pt"})
    return out


def merge_config(tiny_models, bad_models, method: str, kind: str, out: str, **extra) -> dict:
    bad = bad_models[kind]
    models = [{"model": bad}, {"model": tiny_models["ft2"]}]
    if method == "sar":
        models[0]["fisher"], models[1]["fisher"] = bad_models[f"fisher-{kind}"], bad_models["fisher-ft2"]
    cfg = {"merge_method": method, "models": models, "dtype": "float32", "output": out, "seed": 3,
           **METHODS[method], **extra}
    if method != "linear":
        cfg["base_model"] = tiny_models["base"]
    return cfg


def run_merge(cfg: dict, budget: int = 2**30, executor: str = "local") -> dict:
    return execute(prepare(build_plan(MergeJob.from_dict(cfg, where="test"), memory_budget=budget)),
                   executor=executor)


def looks_incomplete(out: str) -> None:
    p = Path(out)
    assert not (p / MANIFEST_NAME).exists()
    assert not (p / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("kind,budget", [("nan", 6_000), ("inf", 2**30)], ids=["nan-chunked", "inf-whole"])
@pytest.mark.parametrize("method", list(METHODS))
def test_nonfinite_input_stops_the_merge(tmp_path, tiny_models, bad_models, method, kind, budget):
    cfg = merge_config(tiny_models, bad_models, method, kind, str(tmp_path / "out"))
    before = sha256_tree(tiny_models["base"], tiny_models["ft2"], bad_models[kind])
    with pytest.raises(NonFiniteError) as e:
        run_merge(cfg, budget)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"model {bad_models[kind]}: tensor '{POISONED}'"), msg
    counts = "3 NaN, 0 +inf, 0 -inf" if kind == "nan" else "0 NaN, 1 +inf, 1 -inf"
    if budget == 2**30:
        assert f"({counts} of 2,048 values)" in msg and "rows" not in msg, msg
    else:  # checked block by block: the first block (its rows depend on the method's sources) holds
        # entry 5 (row 0) and, if 3 rows or more, entry 70 (row 2)
        m = re.search(r"\(rows 0-(\d+) of 64\) has non-finite values \(([12]) NaN, 0 \+inf, 0 -inf of ([\d,]+) values\)", msg)
        assert m, msg
        last, nan, values = int(m[1]), int(m[2]), int(m[3].replace(",", ""))
        assert nan == (2 if last >= 2 else 1) and values == 32 * (last + 1), msg
    assert "allow_nonfinite: true" in msg
    looks_incomplete(str(tmp_path / "out"))
    assert sha256_tree(tiny_models["base"], tiny_models["ft2"], bad_models[kind]) == before


def test_blocks_of_a_state_that_needs_no_pass_are_checked(tmp_path, tiny_models, bad_models):
    """ties at density 1 trims nothing: its state gathers no pass, so the blocks are checked as merged."""
    cfg = merge_config(tiny_models, bad_models, "ties", "inf", str(tmp_path / "out"),
                       parameters={"density": 1.0, "weight": 1.0})
    with pytest.raises(NonFiniteError, match=re.escape(f"model {bad_models['inf']}: tensor '{POISONED}' (rows 0-")):
        run_merge(cfg, 6_000)
    looks_incomplete(str(tmp_path / "out"))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_methods_checked_through_their_output_still_name_the_input(tmp_path, tiny_models, bad_models, method, kind):
    """OUTPUT_COVERS_INPUTS: at weight 0 too (0 * NaN and 0 * inf are NaN), and for a bad base."""
    cfg = merge_config(tiny_models, bad_models, method, kind, str(tmp_path / "out"))
    cfg["models"][0]["parameters"] = {"weight": 0.0}
    with pytest.raises(NonFiniteError, match=re.escape(f"model {bad_models[kind]}: tensor '{POISONED}' (rows 0-")):
        run_merge(cfg, 6_000)
    if method == "task_arithmetic":
        cfg = merge_config(tiny_models, bad_models, method, kind, str(tmp_path / "out"))
        cfg["base_model"], cfg["models"] = bad_models[kind], [{"model": tiny_models["ft2"]}]
        with pytest.raises(NonFiniteError, match=re.escape(f"base model {bad_models[kind]}: tensor '{POISONED}'")):
            run_merge(cfg)
    looks_incomplete(str(tmp_path / "out"))


def test_nonfinite_fisher_statistics_stop_sar(tmp_path, tiny_models, bad_models):
    cfg = merge_config(tiny_models, bad_models, "sar", "nan", str(tmp_path / "out"))
    cfg["models"] = [{"model": tiny_models["ft2"], "fisher": bad_models["fisher-ft2-nan"]},
                     {"model": tiny_models["ft2"], "fisher": bad_models["fisher-ft2"]}]
    with pytest.raises(NonFiniteError, match=re.escape(
            f"fisher statistics {bad_models['fisher-ft2-nan']}: tensor 'model.layers.0.self_attn.q_proj.weight' "
            f"(rows 0-") + r"\d+ of 32\) has non-finite values \(1 NaN, 0 \+inf, 0 -inf of [\d,]+ values\)"):
        run_merge(cfg, 6_000)
    looks_incomplete(str(tmp_path / "out"))


def test_overflow_on_the_cast_to_out_dtype_is_caught(tmp_path, tiny_models, bad_models):
    """1e6 is finite in the bf16 inputs and the float32 merge, +inf in float16."""
    cfg = merge_config(tiny_models, bad_models, "task_arithmetic", "big", str(tmp_path / "out"), out_dtype="float16")
    with pytest.raises(NonFiniteError) as e:
        run_merge(cfg)
    msg = str(e.value)
    assert msg.startswith(f"merged output {tmp_path / 'out'}: tensor '{POISONED}' has non-finite values "
                          f"(0 NaN, 1 +inf, 0 -inf of 2,048 values)"), msg
    assert "computed in F32, written as F16" in msg
    looks_incomplete(str(tmp_path / "out"))
    # the same merge written as bf16 is fine
    cfg["out_dtype"] = "bfloat16"
    run_merge(cfg)
    assert (tmp_path / "out" / MANIFEST_NAME).exists()


def test_opt_out_completes_and_resumes_a_stopped_run(tmp_path, tiny_models, bad_models):
    out = str(tmp_path / "out")
    cfg = merge_config(tiny_models, bad_models, "ties", "nan", out, out_shard_size=20_000)
    with pytest.raises(NonFiniteError):
        run_merge(cfg, 6_000)
    looks_incomplete(out)
    cfg["allow_nonfinite"] = True
    manifest = run_merge(cfg, 6_000)  # resumes into the same output: the flag is not in the plan's identity
    assert manifest["config"]["allow_nonfinite"] is True
    merged = load_safetensors_dir(out)
    assert torch.isnan(merged[POISONED].float()).any()
    fresh = str(tmp_path / "fresh")
    run_merge({**cfg, "output": fresh}, 6_000)
    shards = lambda d: {k: v for k, v in tree_bytes(d).items() if k.endswith(".safetensors")}  # noqa: E731
    assert shards(out) == shards(fresh) and len(shards(out)) > 1


def test_merge_cli_exits_2_with_one_line(tmp_path, tiny_models, bad_models):
    out = tmp_path / "out"
    cfg = merge_config(tiny_models, bad_models, "task_arithmetic", "inf", str(out))
    path = write_config(tmp_path / "m.yaml", json.dumps(cfg))  # JSON is YAML
    before = sha256_tree(tiny_models["base"], tiny_models["ft2"], bad_models["inf"])
    r = run_cli("merge", path, "--executor", "local")
    assert r.returncode == 2, r.stderr
    line = error_line(r.stderr)
    assert line.startswith(f"sar-dist: error: model {bad_models['inf']}: tensor '{POISONED}' has non-finite values "
                           f"(0 NaN, 1 +inf, 1 -inf of 2,048 values)"), line
    looks_incomplete(str(out))
    assert sha256_tree(tiny_models["base"], tiny_models["ft2"], bad_models["inf"]) == before


def test_ray_executor_raises_the_same_error(tmp_path, tiny_models, bad_models, ray_local):
    cfg = merge_config(tiny_models, bad_models, "dare_ties", "nan", str(tmp_path / "out"), out_shard_size=20_000)
    with pytest.raises(NonFiniteError, match=re.escape(f"model {bad_models['nan']}: tensor '{POISONED}'")):
        run_merge(cfg, 6_000, executor="ray")
    looks_incomplete(str(tmp_path / "out"))


def test_config_key_is_a_bool(tiny_models):
    cfg = {"merge_method": "linear", "models": [tiny_models["ft1"], tiny_models["ft2"]], "output": "/tmp/x",
           "parameters": {"weight": 0.5}}
    assert MergeJob.from_dict(cfg).allow_nonfinite is False
    assert MergeJob.from_dict({**cfg, "allow_nonfinite": True}).allow_nonfinite is True
    with pytest.raises(ValueError, match="allow_nonfinite must be true or false"):
        MergeJob.from_dict({**cfg, "allow_nonfinite": "yes"})
    fcfg = {"model": "/m", "data": "/d.jsonl", "output": "/o"}
    assert FisherJob.from_dict({**fcfg, "allow_nonfinite": True}).allow_nonfinite is True
    with pytest.raises(ValueError, match="allow_nonfinite: expected true or false"):
        FisherJob.from_dict({**fcfg, "allow_nonfinite": 1})


# ---------------------------------------------------------------- the check itself

def test_integer_and_bool_tensors_are_not_checked():
    for t in (torch.tensor([2**62, 2**62, 2**62]), torch.tensor([True, False]), torch.arange(10, dtype=torch.int8),
              torch.empty(0), torch.tensor(1.0)):
        assert all_finite(t)
        check_finite(t, "model m", "t")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64,
                                   torch.float8_e5m2, torch.float8_e4m3fn])
def test_the_check_is_exact(dtype):
    big = {torch.float16: 60000.0, torch.float8_e5m2: 50000.0, torch.float8_e4m3fn: 400.0}.get(dtype, 3e38)
    x = torch.full((5000,), big).to(dtype)  # finite entries whose sum overflows: still finite
    assert all_finite(x)
    for pos in (0, 2500, 4999):
        for v in (math.nan, math.inf, -math.inf):
            if dtype == torch.float8_e4m3fn and math.isinf(v):
                continue  # no inf in e4m3fn
            y = torch.randn(5000).to(dtype)
            y[pos] = v
            assert not all_finite(y), (dtype, pos, v)
    y = torch.randn(5000).to(dtype)
    y[3], y[9] = math.nan, math.nan
    if dtype != torch.float8_e4m3fn:
        y[4] = -math.inf
    assert describe(y) == f"2 NaN, 0 +inf, {0 if dtype == torch.float8_e4m3fn else 1} -inf of 5,000 values"


# ---------------------------------------------------------------- Fisher stage

SHAPE = LlamaShape(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64, vocab=64)
Z = 60  # a token whose logit is about -6e37 wherever it is predicted


@pytest.fixture(scope="module")
def fisher_model(tmp_path_factory) -> str:
    """A tiny Llama whose residual dimension 0 is a constant 100 (so the final norm's output there
    is positive everywhere) and whose lm_head row Z is -1e37 along it: every logit of Z is a finite
    -6e37. An example with many Z targets has a log-likelihood of -inf; one with a single Z target
    has a finite one but a squared gradient past float32."""
    url = str(tmp_path_factory.mktemp("fisher-model") / "m")
    make_base(Storage(), url, SHAPE, seed=0, dtype=torch.float32)
    f = Path(url) / "model.safetensors"
    t = load_file(str(f))
    t["model.embed_tokens.weight"][:, 0] = 100.0
    for name in t:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            t[name][0, :] = 0.0
    t["lm_head.weight"][Z, :] = 0.0
    t["lm_head.weight"][Z, 0] = -1e37
    save_file(t, str(f), metadata={"format": "pt"})
    return url


def fisher_data(path: Path, bad: dict[int, int]) -> str:
    """Four tokenized examples; example i has ``bad.get(i, 0)`` targets Z, the others not."""
    lines = []
    for i in range(4):
        ids = [1] + [3 + (7 * i + j) % 50 for j in range(16)]
        for j in range(bad.get(i, 0)):
            ids[1 + j] = Z
        lines.append(json.dumps({"input_ids": ids}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def fisher_spec(model: str, data: str, out: str, **extra):
    plan = build_fisher_plan(FisherJob.from_dict({"model": model, "data": data, "output": out, **extra}))
    assert len(plan.parts) == 1 and plan.parts[0].engine == "torch"
    return plan.parts[0]


def test_fisher_rank_names_the_example_with_a_nonfinite_loss(tmp_path, fisher_model):
    spec = fisher_spec(fisher_model, fisher_data(tmp_path / "d.jsonl", {2: 12}), str(tmp_path / "out"))
    with pytest.raises(NonFiniteError, match=r"^example 2 \(0-based, in data order\): the log-likelihood of its "
                                             r"16 target token\(s\) is -inf; set allow_nonfinite: true"):
        run_rank(spec, rank=0, world=1, master="", num_threads=1)
    assert not (Path(spec.url) / PART_MARKER).exists()


def test_fisher_rank_checks_statistics_before_writing(tmp_path, fisher_model):
    """A finite loss (one Z target) whose squared gradient overflows: named by tensor and part."""
    data = fisher_data(tmp_path / "d.jsonl", {1: 1})
    spec = fisher_spec(fisher_model, data, str(tmp_path / "out"))
    with pytest.raises(NonFiniteError, match=r"^statistics of part 0 \(examples 0-3\): tensor '[\w.]+' has "
                                             r"non-finite values \(\d+ NaN, \d+ \+inf, 0 -inf of [\d,]+ values\)"):
        run_rank(spec, rank=0, world=1, master="", num_threads=1)
    assert not list(Path(spec.url).rglob("*.safetensors")) and not (Path(spec.url) / PART_MARKER).exists()
    # opted out (the driver sets the part's flag at launch), the rank writes its statistics
    spec = dataclasses.replace(fisher_spec(fisher_model, data, str(tmp_path / "out2")), allow_nonfinite=True)
    result = run_rank(spec, rank=0, world=1, master="", num_threads=1)
    assert result["num_examples"] == 4 and (Path(spec.url) / PART_MARKER).exists()


def test_fisher_weights_are_checked_as_loaded(tmp_path, fisher_model):
    bad = poison(fisher_model, str(tmp_path / "bad"), "model.norm.weight", {4: math.nan})
    spec = fisher_spec(bad, fisher_data(tmp_path / "d.jsonl", {}), str(tmp_path / "out"))
    with pytest.raises(NonFiniteError, match=re.escape(f"model {bad}: tensor 'model.norm.weight' has non-finite "
                                                       f"values (1 NaN, 0 +inf, 0 -inf of 32 values)")):
        run_rank(spec, rank=0, world=1, master="", num_threads=1)


def test_fisher_cli_exits_2_without_retry_and_the_opt_out_completes(tmp_path, fisher_model):
    data = fisher_data(tmp_path / "d.jsonl", {2: 12})  # 2 groups: only group 0 (examples 0, 2) fails
    out = tmp_path / "stats"
    cfg = {"model": fisher_model, "data": data, "output": str(out), "groups": 2, "max_retries": 2}
    path = write_config(tmp_path / "f.yaml", json.dumps(cfg))
    before = sha256_tree(fisher_model, data)
    r = run_cli("fisher", path, "--num-cpus", "2", "--json")
    assert r.returncode == 2, r.stderr
    assert error_line(r.stderr).startswith(
        f"sar-dist: error: Fisher statistics of model {fisher_model} on data {data}: example 2 (0-based, in data "
        f"order): the log-likelihood of its 16 target token(s) is -inf"), r.stderr
    assert '"part_retry"' not in r.stdout  # the same data would fail the same way: never retried
    assert not (out / "fisher.json").exists()
    assert not (out / "parts" / "part-00000" / PART_MARKER).exists()
    assert sha256_tree(fisher_model, data) == before

    path = write_config(tmp_path / "f2.yaml", json.dumps({**cfg, "allow_nonfinite": True}))
    r = run_cli("fisher", path, "--num-cpus", "2")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "fisher.json").read_text())
    assert manifest["num_examples"] == 4
    assert sha256_tree(fisher_model, data) == before
