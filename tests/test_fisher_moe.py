"""The Fisher plan of a MoE checkpoint (``qwen3_moe``, one tensor per expert on disk, fused
expert parameters in transformers 5's model class): the mapping between the two, and a
checkpoint that lacks an expert refused.

The statistics themselves, at 1x1 and 1x2 against a plain-PyTorch reference that cuts the
fused gradients into experts by hand, are in tests/test_fisher_arch.py (``qwen3_moe``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sar_dist.checkpoint.index import open_checkpoint
from sar_dist.fisher.config import FisherJob
from sar_dist.fisher.plan import build_fisher_plan
from sar_dist.storage import Storage

MOE = dict(model_type="qwen3_moe", hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=3,
           num_experts_per_tok=2, vocab_size=64, mlp_only_layers=[0], tie_word_embeddings=False)
SEQS = [([5, 9, 17, 3], [-100, -100, 17, 3]), ([7, 30, 2, 44, 12], [-100, 30, 2, 44, 12]),
        ([60, 1, 8], [-100, 1, 8])]


def _model(config: dict):
    import transformers

    cfg = dict(config)
    return transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=torch.float32)


@pytest.fixture(scope="module")
def moe_inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("moe")
    torch.manual_seed(0)
    model = _model(MOE)
    model.save_pretrained(root / "model")
    data = root / "tok.jsonl"
    data.write_text("".join(json.dumps({"input_ids": i, "labels": y}) + "\n" for i, y in SEQS))
    return {"model": str(root / "model"), "data": str(data)}


def test_moe_slots_are_views_that_tile_each_fused_parameter(tmp_path, moe_inputs):
    """Every per-expert tensor is a slot of its fused parameter; together they hold each element
    of it once, where transformers' loader puts them (gate over up in ``gate_up_proj[e]``)."""
    job = FisherJob.from_dict({"model": moe_inputs["model"], "data": moe_inputs["data"],
                               "output": str(tmp_path / "o"), "ranks_per_group": 2})
    plan = build_fisher_plan(job)
    slots = {s.name: s for s in plan.parts[0].slots}
    assert set(slots) == set(open_checkpoint(Storage(), moe_inputs["model"]).tensors)
    fused = "model.layers.1.mlp.experts.gate_up_proj"
    shape = (MOE["num_experts"], 2 * MOE["moe_intermediate_size"], MOE["hidden_size"])
    seen = torch.zeros(shape, dtype=torch.int64).reshape(-1)
    for s in slots.values():
        if s.param == fused:
            offset, strides = s.view
            torch.as_strided(seen, s.shape, strides, offset).add_(1)
    assert (seen == 1).all()
    up1 = slots["model.layers.1.mlp.experts.1.up_proj.weight"]
    inter, hidden = MOE["moe_intermediate_size"], MOE["hidden_size"]
    assert up1.param == fused and up1.view == ((2 * inter + inter) * hidden, (hidden, 1))
    assert slots["model.layers.0.mlp.gate_proj.weight"].view is None  # the dense first layer
    assert slots["model.layers.1.mlp.experts.2.down_proj.weight"].param == "model.layers.1.mlp.experts.down_proj"


def test_moe_partial_checkpoint_is_refused(tmp_path, moe_inputs):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(Path(moe_inputs["model"], "config.json").read_text())
    state = load_file(str(Path(moe_inputs["model"], "model.safetensors")))
    state.pop("model.layers.1.mlp.experts.1.up_proj.weight")
    save_file(state, str(model / "model.safetensors"))
    job = FisherJob.from_dict({"model": str(model), "data": moe_inputs["data"], "output": str(tmp_path / "o")})
    with pytest.raises(ValueError, match="experts.gate_up_proj' of the model class has no tensor"):
        build_fisher_plan(job)


def test_moe_rank_reads_only_its_slice_of_a_fused_parameter(tmp_path, moe_inputs):
    """Each expert tensor is a contiguous run of its fused parameter, so a rank's slice is
    assembled from range reads of the runs that overlap it, equal to the slice of the whole."""
    from sar_dist.checkpoint.reader import read_flat
    from sar_dist.fisher.worker import _flat_span, _load_param

    job = FisherJob.from_dict({"model": moe_inputs["model"], "data": moe_inputs["data"],
                               "output": str(tmp_path / "o"), "ranks_per_group": 3})
    spec = build_fisher_plan(job).parts[0]
    storage = Storage()
    checkpoint = open_checkpoint(storage, moe_inputs["model"])
    fused = [s for s in spec.slots if s.param == "model.layers.1.mlp.experts.gate_up_proj"]
    assert all(_flat_span(s) is not None for s in fused)
    numel = MOE["num_experts"] * 2 * MOE["moe_intermediate_size"] * MOE["hidden_size"]
    whole = torch.empty(numel, dtype=torch.float32)
    for s in fused:
        offset, strides = s.view
        torch.as_strided(whole, s.shape, strides, offset).copy_(
            read_flat(storage, checkpoint.tensors[s.name], 0, checkpoint.tensors[s.name].info.numel).view(s.shape))
    for start, end in [(0, numel // 3), (numel // 3 + 5, 2 * numel // 3 - 7), (numel - 11, numel)]:
        assert torch.equal(_load_param(spec, storage, checkpoint, fused, numel, start, end), whole[start:end])
    # a transposed view is not one run: the whole-parameter path serves it
    t = fused[0]
    import dataclasses

    flipped = dataclasses.replace(t, shape=t.shape[::-1], view=(t.view[0], t.view[1][::-1]))
    assert _flat_span(flipped) is None
