"""``sar-dist fisher`` as a user runs it: bad input exits 2 with one line before any worker
starts and writes nothing; a good run prints JSON events and leaves complete statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sar_dist.cli import main
from sar_dist.fisher.config import FisherJob
from sar_dist.fisher.plan import build_fisher_plan
from sar_dist.storage import Storage
from sar_dist.synthetic import LlamaShape, make_base
from tests.conftest import run_cli

SHAPE = LlamaShape(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64, vocab=64)
GOOD = '{"prompt": "w1 w2 w3", "response": "w4 w5"}\n'


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("fisher-cli")
    make_base(Storage(), str(root / "model"), SHAPE, seed=0)
    return str(root / "model")


def _fisher(tmp_path: Path, model: str, data_text: str, *extra: str, capsys) -> tuple[int, str, Path]:
    data = tmp_path / "data.jsonl"
    data.write_text(data_text)
    out = tmp_path / "out"
    code = main(["fisher", "--model", model, "--data", str(data), "--output", str(out), *extra])
    err = capsys.readouterr().err.strip()
    return code, err, out


@pytest.mark.parametrize(
    "data_text,extra,message",
    [
        (GOOD + "\n" + GOOD, [], "line 2: empty line"),
        (GOOD + '{"prompt": "w1", "response": \n', [], "line 2: not valid JSON"),
        (GOOD + '["w1"]\n', [], "line 2: expected a JSON object"),
        (GOOD + '{"text": "w1 w2"}\n', [], "line 2: a {\"text\"} record in a file of {\"prompt\",\"response\"} records"),
        (GOOD + '{"prompt": "w1", "response": ""}\n', [], "line 2: empty 'response'"),
        ('{"input_ids": [1, 2, 99]}\n', [], "line 1: token id 99 is outside the model's vocabulary"),
        ('{"input_ids": [1, 2, 3], "labels": [1, 2]}\n', [], "line 1: 'labels' has 2 entries"),
        ('{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}\n', [], "line 1: no target tokens"),
        (GOOD + '{"prompt": "w1 w2 w3 w4 w5 w6", "response": "w7"}\n', ["--max-length", "6", "--overlength", "refuse"],
         "line 2: 7 tokens, more than max_length=6"),
        (GOOD, ["--groups", "2"], "1 example(s) for 2 groups"),
        (GOOD, ["--estimator", "fancy"], None),  # argparse: exit 2 with its usage line
    ],
    ids=["empty-line", "bad-json", "not-object", "mixed-formats", "empty-response", "token-range",
         "labels-length", "no-targets", "overlength-refuse", "more-groups-than-examples", "bad-choice"],
)
def test_bad_data_exits_2_and_writes_nothing(tmp_path, model_dir, capsys, data_text, extra, message):
    if message is None:
        with pytest.raises(SystemExit) as e:
            _fisher(tmp_path, model_dir, data_text, *extra, capsys=capsys)
        assert e.value.code == 2
        return
    code, err, out = _fisher(tmp_path, model_dir, data_text, *extra, capsys=capsys)
    assert code == 2, err
    assert message in err and len(err.splitlines()) == 1, err
    assert str(tmp_path / "data.jsonl") in err or "groups" in err
    assert not out.exists()


def test_text_data_without_a_tokenizer(tmp_path, capsys):
    model = tmp_path / "model"
    make_base(Storage(), str(model), SHAPE, seed=0, tokenizer=False)
    code, err, out = _fisher(tmp_path, str(model), GOOD, capsys=capsys)
    assert code == 2 and "no tokenizer.json" in err and not out.exists()
    # pre-tokenized data needs none
    plan = build_fisher_plan(FisherJob.from_dict({"model": str(model), "data": _write(tmp_path, '{"input_ids": [1, 5, 6]}\n'),
                                                  "output": str(out)}))
    assert plan.data.format == "tokenized" and plan.data.num_targets == 2


def test_model_without_safetensors(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04")
    (model / "config.json").write_text("{}")
    code, err, out = _fisher(tmp_path, str(model), GOOD, capsys=capsys)
    assert code == 2 and "only pickled weights" in err and not out.exists()


def test_config_errors(tmp_path, model_dir, capsys):
    data = _write(tmp_path, GOOD)
    for body, message in [
        ({"model": model_dir, "data": data, "output": "o", "epochs": 3}, "unknown key 'epochs'"),
        ({"model": model_dir, "data": data}, "'output' is required"),
        ({"model": model_dir, "data": data, "output": "o", "deepspeed": {"optimizer": {}}}, "deepspeed.optimizer: set by sar-dist"),
        ({"model": model_dir, "data": data, "output": "o", "deepspeed": {"zero_optimization": {"stage": 2}}}, "must be 3"),
        ({"model": model_dir, "data": data, "output": "o", "storage_options": {"secret": "x"}}, "looks like a credential"),
        ({"model": model_dir, "data": data, "output": "o", "groups": 0}, "groups: expected an integer >= 1"),
    ]:
        cfg = tmp_path / "fisher.yaml"
        cfg.write_text(json.dumps(body))
        assert main(["fisher", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert message in err, (message, err)


def test_truncation_is_counted(tmp_path, model_dir):
    long = '{"prompt": "w1 w2", "response": "w3 w4 w5 w6 w7 w8"}\n'
    plan = build_fisher_plan(FisherJob.from_dict({"model": model_dir, "data": _write(tmp_path, GOOD + long),
                                                  "output": str(tmp_path / "o"), "max_length": 5}))
    assert plan.data.truncated == 1
    assert [len(e.input_ids) for e in plan.data.examples] == [5, 5]
    assert plan.data.examples[1].num_targets == 3


def test_cli_run_json_events_and_refusal_of_another_job(tmp_path, model_dir):
    data = _write(tmp_path, GOOD * 3)
    out = tmp_path / "out"
    args = ["fisher", "--model", model_dir, "--data", data, "--output", str(out), "--json", "--num-cpus", "2"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "committed" and "part_done" in kinds
    assert json.loads((out / "fisher.json").read_text())["num_examples"] == 3
    r = run_cli("inspect", str(out))
    assert r.returncode == 0 and "F32" in r.stdout

    # the same output for a different job is refused without --force
    r = run_cli(*args, "--seed", "1", "--estimator", "sampled")
    assert r.returncode == 2 and "different job" in r.stderr and "--force" in r.stderr

    # a group larger than the cluster is bad input, found before any worker starts
    other = tmp_path / "other"
    r = run_cli("fisher", "--model", model_dir, "--data", data, "--output", str(other), "--num-cpus", "1",
                "--ranks-per-group", "2")
    assert r.returncode == 2 and "does not fit" in r.stderr and not other.exists()


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    return str(path)
