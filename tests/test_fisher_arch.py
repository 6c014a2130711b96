"""The Fisher stage and a SAR merge across architectures, each a tiny random model saved by
transformers' own ``save_pretrained`` (so on disk as real checkpoints of that family are):
Llama (untied and tied), Qwen2, Qwen3, Qwen3-MoE (per-expert tensors on disk, fused in the
model class), Mistral, Gemma2 and Phi3 (fused qkv/gate_up in both).

For each: Fisher of one fine-tune at 1x1 (plain autograd) and of another at 1x2 (ZeRO-3),
both against the plain-PyTorch reference; a SAR merge of the two with those statistics; the
merged output loaded by transformers and run forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sar_dist.checkpoint.index import open_checkpoint
from sar_dist.checkpoint.reader import read_tensor
from sar_dist.cli import main as cli_main
from sar_dist.fisher.config import FisherJob
from sar_dist.fisher.plan import build_fisher_plan
from sar_dist.fisher.run import run_fisher
from sar_dist.storage import Storage
from sar_dist.synthetic import make_finetune
from tests.conftest import write_config

_COMMON = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
ARCHS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False, **_COMMON),
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True, **_COMMON),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False, **_COMMON),
    "qwen3": dict(model_type="qwen3", head_dim=8, tie_word_embeddings=False, **_COMMON),
    # layer 0 dense (mlp_only_layers), layer 1 with 3 experts
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=8, moe_intermediate_size=8, num_experts=3,
                      num_experts_per_tok=2, mlp_only_layers=[0], tie_word_embeddings=False, **_COMMON),
    "mistral": dict(model_type="mistral", head_dim=8, tie_word_embeddings=False, **_COMMON),
    "gemma2": dict(model_type="gemma2", head_dim=8, **_COMMON),
    "phi3": dict(model_type="phi3", tie_word_embeddings=False, pad_token_id=0, **_COMMON),
}
SEQS = [([5, 9, 17, 3, 22], [-100, -100, 17, 3, 22]), ([7, 30, 2, 44], [-100, 30, 2, 44])]
ZERO3 = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}  # every parameter fetched/released


def _save_tiny(config: dict, url: Path, seed: int) -> None:
    import transformers

    cfg = dict(config)
    config_obj = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config_obj, dtype=torch.float32).save_pretrained(url)


def reference(model_dir: str, config: dict) -> dict[str, torch.Tensor]:
    """Sum over SEQS of squared per-example gradients, plain PyTorch on the model transformers
    loads; fused experts cut into the checkpoint's per-expert tensors by hand."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    sums = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    for ids, labels in SEQS:
        model.zero_grad()
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0][:-1].float(), dim=-1)
        y = torch.tensor(labels[1:])
        keep = y != -100
        logp[keep].gather(1, y[keep].unsqueeze(1)).sum().backward()
        for n, p in model.named_parameters():
            sums[n] += p.grad.double() ** 2
    out = {}
    for n, t in sums.items():
        if n.endswith("mlp.experts.gate_up_proj"):
            stem, inter = n.removesuffix("gate_up_proj"), config["moe_intermediate_size"]
            for e in range(t.shape[0]):
                out[f"{stem}{e}.gate_proj.weight"], out[f"{stem}{e}.up_proj.weight"] = t[e, :inter], t[e, inter:]
        elif n.endswith("mlp.experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{n.removesuffix('down_proj')}{e}.down_proj.weight"] = t[e]
        else:
            out[n] = t
    return {n: t.float() for n, t in out.items()}


def _check(stats_dir: str, model_dir: str, config: dict) -> None:
    storage = Storage()
    got = {n: read_tensor(storage, r) for n, r in open_checkpoint(storage, stats_dir, stem="fisher").tensors.items()}
    ckpt = open_checkpoint(storage, model_dir).tensors
    ref = reference(model_dir, config)
    assert set(got) == set(ckpt) == set(ref)
    nonzero = 0
    for name, r in ref.items():
        assert got[name].shape == tuple(ckpt[name].info.shape) == r.shape, name
        scale = r.abs().max().item()
        if scale == 0:  # an expert no token was routed to
            assert got[name].abs().max().item() == 0, name
            continue
        nonzero += 1
        err = (got[name] - r).abs().max().item() / scale
        assert err < 2e-5, f"{name}: max error {err:.2e} of the largest entry"
    assert nonzero > len(ref) // 2


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture(tmp_path, ray_local, arch):
    import transformers

    config = ARCHS[arch]
    storage = Storage()
    base = tmp_path / "base"
    _save_tiny(config, base, seed=1)
    fts = [str(tmp_path / f"ft{i}") for i in (1, 2)]
    for i, (ft, region) in enumerate(zip(fts, [(0.0, 0.6), (0.4, 1.0)], strict=True)):
        make_finetune(storage, str(base), ft, seed=i + 1, density=0.2, scale=0.5, region=region)
    data = tmp_path / "tok.jsonl"
    data.write_text("".join(json.dumps({"input_ids": i, "labels": y}) + "\n" for i, y in SEQS))

    fishers = [str(tmp_path / f"fisher{i}") for i in (1, 2)]
    for ft, out, ranks in zip(fts, fishers, [1, 2], strict=True):
        job = FisherJob.from_dict({"model": ft, "data": str(data), "output": out, "ranks_per_group": ranks,
                                   "deepspeed": ZERO3 if ranks == 2 else {}})
        manifest = run_fisher(build_fisher_plan(job), poll_s=0.5)
        assert manifest["engine"] == ("torch" if ranks == 1 else "deepspeed")
        _check(out, ft, config)

    merged = tmp_path / "merged"
    cfg = write_config(tmp_path / "sar.yaml",
                       f"merge_method: sar\nbase_model: {base}\nmodels:\n"
                       f"  - model: {fts[0]}\n    fisher: {fishers[0]}\n"
                       f"  - model: {fts[1]}\n    fisher: {fishers[1]}\n"
                       f"parameters: {{arbitration: sensitivity, fisher_norm: l2, density: 1.0}}\n"
                       f"dtype: float32\noutput: {merged}\n")
    assert cli_main(["merge", cfg, "--executor", "local"]) == 0
    assert Path(merged, "sar_merge.json").exists()

    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    base_model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = torch.tensor([SEQS[0][0]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        base_logits = base_model(input_ids=ids).logits
    assert logits.shape == (1, len(SEQS[0][0]), config["vocab_size"])
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits, base_logits)  # the merge changed the model
