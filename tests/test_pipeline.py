"""``sar-dist run PIPELINE.yaml``: the Fisher stage of every model, the merge and the report from one
file, on the embedded local Ray. Its outputs are byte-identical to the stages run by hand; a rerun
and each stage run alone are idempotent; existing statistics are reused and statistics of another
model are refused; every bad input exits 2 before any work, with nothing written.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import yaml

from sar_dist.cli import main
from sar_dist.storage import Storage
from sar_dist.synthetic import LlamaShape, make_base, make_finetune
from tests.conftest import REPO, run_cli, tree_bytes, write_config

SHAPE = LlamaShape(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64, vocab=64)
FISHER = {"groups": 2, "max_length": 16, "seed": 0}
MERGE = {"merge_method": "sar", "parameters": {"density": 0.5}, "dtype": "float32", "out_shard_size": 8000}


def _files(root: str | Path) -> dict[str, bytes]:
    """Tensors and JSON of an output, the manifests (timings) aside."""
    return {n: b for n, b in tree_bytes(root).items()
            if n.endswith((".safetensors", ".json")) and not n.endswith(("sar_merge.json", "fisher.json"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pipeline")
    storage = Storage()
    paths = {"root": str(root), "base": str(root / "base")}
    make_base(storage, paths["base"], SHAPE, seed=0)
    for i, name in enumerate(("math", "code")):
        paths[name] = str(root / name)
        make_finetune(storage, paths["base"], paths[name], seed=i + 1, density=0.05, region=(0.3 * i, 0.6 + 0.4 * i))
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"w{j} w{j + i + 1} w3", "response": f"w{j + 2} w5"}) + "\n"
                                for j in range(1, 9)))
        paths[f"{name}-data"] = str(data)
    return paths


def _pipeline(inputs: dict[str, str], where: Path, **changes) -> dict:
    d = {
        "base_model": inputs["base"],
        "models": [{"name": "math", "model": inputs["math"], "data": inputs["math-data"]},
                   {"name": "code", "model": inputs["code"], "data": inputs["code-data"], "fisher": {"groups": 1}}],
        "fisher": dict(FISHER),
        "merge": dict(MERGE),
        "statistics": str(where / "stats"),
        "output": str(where / "merged"),
        "analyze": {"output": str(where / "report")},
    }
    d.update(changes)
    return d


def _write(path: Path, d: dict) -> str:
    return write_config(path, yaml.safe_dump(d))


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def by_hand(inputs, tmp_path_factory) -> Path:
    """The stages as a user runs them without a pipeline file: two `sar-dist fisher`, one merge."""
    root = tmp_path_factory.mktemp("by-hand")
    for name, groups in (("math", 2), ("code", 1)):
        r = run_cli("fisher", "--model", inputs[name], "--data", inputs[f"{name}-data"], "--output",
                    str(root / "stats" / name), "--groups", str(groups), "--max-length", "16", "--seed", "0",
                    "--num-cpus", "2")
        assert r.returncode == 0, r.stderr
    config = write_config(root / "sar.yaml", yaml.safe_dump({
        **MERGE, "base_model": inputs["base"],
        "models": [{"model": inputs[n], "fisher": str(root / "stats" / n)} for n in ("math", "code")]}))
    r = run_cli("merge", config, "--output", str(root / "merged"), "--num-cpus", "2")
    assert r.returncode == 0, r.stderr
    return root


@pytest.fixture(scope="module")
def piped(inputs, tmp_path_factory) -> tuple[Path, str, list[dict]]:
    """One `sar-dist run` of the whole pipeline."""
    root = tmp_path_factory.mktemp("piped")
    path = _write(root / "pipeline.yaml", _pipeline(inputs, root))
    r = run_cli("run", path, "--json", "--num-cpus", "2")
    assert r.returncode == 0, r.stderr
    return root, path, _events(r.stdout)


def test_pipeline_equals_the_stages_by_hand(piped, by_hand, inputs):
    root, _, events = piped
    for name in ("math", "code"):
        assert _files(root / "stats" / name) == _files(by_hand / "stats" / name), name
    assert _files(root / "merged") == _files(by_hand / "merged")
    assert len([n for n in _files(root / "merged") if n.endswith(".safetensors")]) > 1  # several shard tasks
    assert (root / "report" / "report.json").is_file()
    # events name their stage and model; the stages ran in order
    stages = [e["stage"] for e in events if e["event"] == "stage_start"]
    assert stages == ["fisher", "merge", "analyze"]
    fisher_done = {e["model"] for e in events if e.get("stage") == "fisher" and e["event"] == "committed"}
    assert fisher_done == {"math", "code"}
    assert all("stage" in e for e in events)
    # the manifest records the statistics each model's merge used
    manifest = json.loads((root / "merged" / "sar_merge.json").read_text())
    recorded = {s["model"]: s for s in manifest["statistics"]}
    for name in ("math", "code"):
        fisher = json.loads((root / "stats" / name / "fisher.json").read_text())
        assert recorded[inputs[name]]["fisher"] == str(root / "stats" / name)
        assert recorded[inputs[name]]["job_id"] == fisher["job_id"]
        assert recorded[inputs[name]]["num_examples"] == fisher["num_examples"] == 8


def test_rerun_and_each_stage_alone_are_idempotent(piped):
    root, path, _ = piped
    before = _files(root / "merged")
    r = run_cli("run", path, "--json", "--num-cpus", "2")
    assert r.returncode == 0, r.stderr
    events = _events(r.stdout)
    done = {(e["stage"], e.get("model")) for e in events if e["event"] == "already_complete"}
    assert done == {("fisher", "math"), ("fisher", "code"), ("merge", None)}, done
    assert not any(e["event"] in ("part_done", "shard_done") for e in events)
    assert _files(root / "merged") == before
    for stage in (["--stage", "fisher", "--model", "code"], ["--stage", "merge"]):
        r = run_cli("run", path, *stage, "--json", "--num-cpus", "2")
        assert r.returncode == 0, r.stderr
        assert [e["event"] for e in _events(r.stdout) if e["event"] not in ("stage_start", "stage_done")] \
            == ["already_complete"], r.stdout


def test_stage_by_stage_as_an_orchestrator_runs_it(inputs, piped, tmp_path):
    path = _write(tmp_path / "pipeline.yaml", _pipeline(inputs, tmp_path, analyze=None))
    # the merge before the statistics: refused, naming the model, nothing written
    code = main(["run", path, "--stage", "merge"])
    assert code == 2 and not (tmp_path / "merged").exists()
    for name in ("math", "code"):
        assert main(["run", path, "--stage", "fisher", "--model", name, "--num-cpus", "2"]) == 0
        assert (tmp_path / "stats" / name / "fisher.json").is_file()
    assert not (tmp_path / "merged").exists()  # a Fisher stage writes only its statistics
    assert main(["run", path, "--stage", "merge", "--num-cpus", "2"]) == 0
    assert _files(tmp_path / "merged") == _files(piped[0] / "merged")


def test_existing_statistics_are_reused_and_others_refused(inputs, piped, tmp_path, capsys):
    stats = piped[0] / "stats"
    d = _pipeline(inputs, tmp_path, analyze=None)
    del d["statistics"]
    for m in d["models"]:
        m.pop("data"), m.pop("fisher", None)
        m["statistics"] = str(stats / m["name"])
    path = _write(tmp_path / "reuse.yaml", d)
    assert main(["run", path, "--num-cpus", "2"]) == 0
    assert _files(tmp_path / "merged") == _files(piped[0] / "merged")
    assert [p.name for p in stats.iterdir()] and not (tmp_path / "stats").exists()
    capsys.readouterr()

    # statistics of the other model: exit 2 before any work, naming both models
    d["models"][0]["statistics"], d["models"][1]["statistics"] = str(stats / "code"), str(stats / "math")
    d["output"] = str(tmp_path / "merged-swapped")
    code = main(["run", _write(tmp_path / "swapped.yaml", d)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert inputs["math"] in err and inputs["code"] in err, err
    assert not (tmp_path / "merged-swapped").exists()


def _bad(inputs: dict[str, str], where: Path, case: str) -> dict:
    d = _pipeline(inputs, where)
    if case == "unknown-key":
        d["fisherr"] = {}
    elif case == "data-and-statistics":
        d["models"][0]["statistics"] = str(where / "x")
    elif case == "neither":
        d["models"][0].pop("data")
    elif case == "duplicate-name":
        d["models"][1]["name"] = "math"
    elif case == "owned-key":
        d["merge"]["models"] = []
    elif case == "output-in-model":
        d["output"] = str(Path(inputs["math"]) / "merged")
    elif case == "statistics-in-output":
        d["statistics"] = str(where / "merged" / "stats")
    elif case == "report-is-output":
        d["analyze"] = {"output": d["output"]}
    elif case == "bad-fisher-setting":
        d["fisher"]["groups"] = 0
    elif case == "bad-merge-setting":
        d["merge"]["parameters"] = {"density": 2.0}
    elif case == "missing-data":
        d["models"][1]["data"] = str(where / "nowhere.jsonl")
    return d


BAD = {
    "unknown-key": "unknown key 'fisherr'",
    "data-and-statistics": "exactly one of 'data'",
    "neither": "exactly one of 'data'",
    "duplicate-name": "listed twice",
    "owned-key": "merge.models: set by the pipeline file itself",
    "output-in-model": "output",
    "statistics-in-output": "statistics of math",
    "report-is-output": "analyze.output",
    "bad-fisher-setting": "groups",
    "bad-merge-setting": "density",
    "missing-data": "nowhere.jsonl",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pipeline_files_exit_2_before_any_work(inputs, tmp_path, capsys, case):
    path = _write(tmp_path / "pipeline.yaml", _bad(inputs, tmp_path, case))
    before = sorted(os.listdir(inputs["root"]))
    code = main(["run", path])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and BAD[case] in err, err
    assert sorted(os.listdir(tmp_path)) == ["pipeline.yaml"]  # nothing written
    assert sorted(os.listdir(inputs["root"])) == before


@pytest.mark.parametrize("args,message", [
    (["--model", "math"], "--model: only with --stage fisher"),
    (["--stage", "fisher", "--model", "nope"], "'nope' is not in the file"),
])
def test_bad_flags_exit_2(inputs, tmp_path, capsys, args, message):
    path = _write(tmp_path / "pipeline.yaml", _pipeline(inputs, tmp_path))
    assert main(["run", path, *args]) == 2
    assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["pipeline.yaml"]


def test_analyze_stage_needs_its_section(inputs, tmp_path, capsys):
    path = _write(tmp_path / "pipeline.yaml", _pipeline(inputs, tmp_path, analyze=None))
    assert main(["run", path, "--stage", "analyze"]) == 2
    assert "no 'analyze' section" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_writes_nothing(inputs, tmp_path, capsys):
    path = _write(tmp_path / "pipeline.yaml", _pipeline(inputs, tmp_path))
    assert main(["run", path, "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    stages = {s["stage"]: s for s in plan["stages"]}
    assert list(stages) == ["fisher", "merge", "analyze"]
    fisher = {m["model"]: m for m in stages["fisher"]["models"]}
    assert fisher["math"]["tasks"] == 2 and fisher["code"]["tasks"] == 1
    assert all(m["est_peak_bytes_per_rank"] > 0 and m["read_bytes"] > 0 for m in fisher.values())
    assert stages["merge"]["num_shards"] > 1 and stages["merge"]["status"] == "waits for the Fisher stage"
    assert sorted(os.listdir(tmp_path)) == ["pipeline.yaml"]


def test_demo_pipeline_file_is_valid():
    from sar_dist.pipeline.config import pipeline_from_dict

    d = yaml.safe_load((REPO / "configs" / "pipeline" / "demo.yaml").read_text())
    job = pipeline_from_dict(d, where="demo.yaml")
    assert [m.name for m in job.models] == ["rl-math", "rl-code"]
    assert job.merge.method.name == "sar" and job.analyze is not None


def test_live_progress_bars_on_a_terminal(inputs, piped, tmp_path):
    """stderr a terminal: tqdm bars with tensors, bytes, rate and ETA; not a terminal: log lines."""
    config = write_config(tmp_path / "sar.yaml", yaml.safe_dump({
        **MERGE, "base_model": inputs["base"],
        "models": [{"model": inputs[n], "fisher": str(piped[0] / "stats" / n)} for n in ("math", "code")]}))
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns of a terminal
    proc = subprocess.Popen([sys.executable, "-m", "sar_dist.cli", "merge", config, "--output", str(tmp_path / "out"),
                             "--executor", "local"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=child, cwd=REPO, env={k: v for k, v in os.environ.items() if k != "SAR_DIST_NO_BARS"})
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(parent)
    assert proc.wait(timeout=120) == 0, out.decode(errors="replace")
    text = out.decode(errors="replace")
    assert "merge" in text and "100%" in text and "tensors 12/12" in text and "B/s" in text, text
    assert "\r" in text  # redrawn in place


def test_driver_killed_in_each_stage_then_rerun_resumes_identical(inputs, piped, tmp_path):
    """SIGKILL of the `sar-dist run` driver during the Fisher stage, then during the merge: each
    rerun resumes from what was finished, and the outputs equal an uninterrupted run's."""
    from tests.test_driver_kill import Driver

    path = _write(tmp_path / "pipeline.yaml", _pipeline(inputs, tmp_path, analyze=None))

    def kill_after(stage: str, event: str) -> Driver:
        d = Driver("run", path, "--num-cpus", "1")
        for e in d.events():
            if e.get("stage") == stage and e["event"] == event:
                d.kill()
                return d
        raise AssertionError(f"the run ended (exit {d.proc.wait()}) before any {stage} {event!r} event")

    drivers = [kill_after("fisher", "part_done")]
    try:
        parts = [p for p in (tmp_path / "stats").glob("*/parts/*") if (p / "part.json").exists()]
        assert parts and not (tmp_path / "stats" / "math" / "fisher.json").exists()
        assert not (tmp_path / "merged").exists()
        drivers.append(kill_after("merge", "shard_done"))
        receipts = list((tmp_path / "merged" / ".sar_dist").glob("*.safetensors.json"))
        assert receipts and not (tmp_path / "merged" / "sar_merge.json").exists()
        d = Driver("run", path, "--num-cpus", "1")
        events = list(d.events())
        assert d.proc.wait(timeout=300) == 0, events[-3:]
    finally:
        for d in drivers:
            d.reap()
    start = next(e for e in events if e.get("stage") == "merge" and e["event"] == "start")
    assert start["resumed_shards"] >= len(receipts)
    for name in ("math", "code"):
        assert _files(tmp_path / "stats" / name) == _files(piped[0] / "stats" / name), name
    assert _files(tmp_path / "merged") == _files(piped[0] / "merged")
    assert sorted(os.listdir(tmp_path / "merged")) == sorted(os.listdir(piped[0] / "merged"))
