"""MergeJob validation and per-tensor parameter resolution (filters, gradients)."""

from __future__ import annotations

import pytest

from sar_dist.config import MergeJob, parse_size
from sar_dist.merge.registry import get_method
from sar_dist.plan.params import evaluate, layer_index, layer_position, resolve


def _job(**over):
    d = {
        "merge_method": "ties",
        "base_model": "/m/base",
        "models": [{"model": "/m/a", "parameters": {"weight": 0.5, "density": 0.3}}, {"model": "/m/b"}],
        "parameters": {"density": 0.7, "lambda": 1.5, "weight": 1.0},
        "output": "/out",
    }
    d.update(over)
    return MergeJob.from_dict(d, where="cfg.yaml")


def test_valid_job_roundtrip():
    job = _job()
    assert job.merge_method == "ties" and len(job.models) == 2 and job.seed == 0
    again = MergeJob.from_dict(job.to_dict(), where="again")
    assert again == job


@pytest.mark.parametrize("over, fragment", [
    ({"merge_method": "nope"}, "unknown merge_method 'nope'"),
    ({"wat": 1}, "unknown key 'wat'"),
    ({"slices": []}, "'slices' (layer-range merges) is not supported"),
    ({"models": []}, "'models' must be a non-empty list"),
    ({"models": [{"model": "/m/a", "weight": 1}]}, "models[0]: unknown key 'weight'"),
    ({"parameters": {"densty": 0.5}}, "unknown parameter 'densty' for merge_method 'ties'"),
    ({"models": [{"model": "/m/a", "parameters": {"lambda": 2}}]}, "'lambda' is a method-wide parameter"),
    ({"base_model": None}, "needs 'base_model'"),
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"storage_options": {"client_kwargs": {"aws_secret_access_key": "x"}}}, "looks like a credential"),
    ({"storage_options": {"key": "x"}}, "looks like a credential"),
    ({"output": None}, "missing 'output'"),
    ({"tokenizer_source": "union"}, "'union' is not supported"),
    ({"parameters": {"density": {"a": 1}}}, "expected a number, a list of numbers"),
    ({"parameters": {"density": [{"filter": "mlp"}]}}, "expected {filter: str, value: ...}"),
    ({"out_shard_size": "lots"}, "cannot parse size"),
    ({"models": [{"model": "/m/a", "parameters": {"weight": 1}}, {"model": "/m/b"}], "parameters": {}},
     "needs parameter 'weight' for model /m/b"),
])
def test_bad_config_names_file_and_key(over, fragment):
    with pytest.raises(ValueError) as e:
        _job(**over)
    assert fragment in str(e.value) and str(e.value).startswith("cfg.yaml")


def test_slerp_needs_exactly_one_other_model():
    with pytest.raises(ValueError, match="exactly 1 non-base"):
        MergeJob.from_dict({"merge_method": "slerp", "base_model": "/b", "parameters": {"t": 0.5},
                            "models": [{"model": "/b"}, {"model": "/x"}, {"model": "/y"}], "output": "/o"})
    job = MergeJob.from_dict({"merge_method": "slerp", "base_model": "/b", "parameters": {"t": 0.5},
                              "models": [{"model": "/b"}, {"model": "/x"}], "output": "/o"})
    assert job.merge_method == "slerp"


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size(1000) == 1000 and parse_size("1e6") == 10**6 and parse_size("2KiB") == 2048


def test_layer_position_and_gradients():
    assert layer_index("model.layers.7.mlp.up_proj.weight") == 7 and layer_index("lm_head.weight") is None
    assert layer_position("model.layers.3.x", 4) == 1.0 and layer_position("model.embed_tokens.weight", 4) == 0.0
    # np.interp over evenly spaced anchors
    assert evaluate([0.0, 1.0], "model.layers.1.x", 0.5) == pytest.approx(0.5)
    assert evaluate([0.0, 1.0, 0.0], "n", 0.25) == pytest.approx(0.5)
    flt = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.2, 0.4]}, {"value": 0.9}]
    assert evaluate(flt, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0.1
    assert evaluate(flt, "model.layers.1.mlp.up_proj.weight", 1.0) == pytest.approx(0.4)
    assert evaluate(flt, "model.norm.weight", 0.0) == 0.9


def test_resolve_precedence_model_over_top_over_default():
    method = get_method("ties")
    p = resolve(method, "model.layers.0.mlp.up_proj.weight", 0.0,
                {"density": 0.7, "lambda": 1.5, "weight": 2.0},
                [{"weight": 0.5, "density": 0.3}, {}])
    assert p.weights == (0.5, 2.0) and p.densities == (0.3, 0.7)
    assert p.lambda_ == 1.5 and p.normalize is True
    with pytest.raises(ValueError, match="model 1 needs parameter 'weight'"):
        resolve(method, "x", 0.0, {}, [{"weight": 1.0}, {}])  # as in mergekit, weight is required
    with pytest.raises(ValueError, match="expected true or false"):
        resolve(method, "x", 0.0, {"normalize": 3, "weight": 1.0}, [{}])
