"""Llama-shaped checkpoints built on the fly: a random base and RLVR-like fine-tunes.

Used by the demo, the tests and the benchmarks (no downloads anywhere). Checkpoints
are written tensor by tensor through the same ``ShardWriter`` as merge outputs, so a
model far larger than memory can be made. An RLVR-like fine-tune changes a small,
random fraction of each tensor's entries (RL from verifiable rewards leaves most
parameters bitwise unchanged in bf16; arXiv 2606.18521) and leaves the rest untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sar_dist.checkpoint.format import TORCH_TO_ST, order_for_writing, pack_in_order
from sar_dist.checkpoint.index import content_fingerprint, open_checkpoint
from sar_dist.checkpoint.reader import read_tensor
from sar_dist.checkpoint.writer import ShardWriter
from sar_dist.storage import Storage, join


@dataclass(frozen=True, kw_only=True, slots=True)
class LlamaShape:
    """Sizes of a Llama-architecture model."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 256
    tie_embeddings: bool = False

    def config_json(self, dtype: torch.dtype) -> dict:
        """A transformers ``LlamaConfig`` as written in ``config.json``."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor names and shapes in the order transformers lists them."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes[p + "self_attn.q_proj.weight"] = (h, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, h)
            shapes[p + "mlp.gate_proj.weight"] = (self.intermediate, h)
            shapes[p + "mlp.up_proj.weight"] = (self.intermediate, h)
            shapes[p + "mlp.down_proj.weight"] = (h, self.intermediate)
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab, h)
        return shapes

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.tensor_shapes().values())


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def write_checkpoint(
    storage: Storage,
    url: str,
    shapes: dict[str, tuple[int, ...]],
    make: Callable[[str, tuple[int, ...]], torch.Tensor],
    dtype: torch.dtype,
    *,
    config: dict | None = None,
    max_shard_bytes: int = 2**62,
    stem: str = "model",
) -> None:
    """Write a (sharded) safetensors checkpoint, one tensor in memory at a time.

    Args:
        storage: where to write.
        url: checkpoint directory.
        shapes: tensor names and shapes, in index order.
        make: produces each tensor (any float dtype; cast to ``dtype``).
        dtype: stored dtype.
        config: written as ``config.json`` when given.
        max_shard_bytes: shard size limit.
        stem: file stem (``model`` or ``fisher``).
    """
    st = TORCH_TO_ST[dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = pack_in_order([(n, math.prod(s) * itemsize) for n, s in shapes.items()], max_shard_bytes)
    files = (
        [f"{stem}.safetensors"]
        if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file, names in zip(files, shards, strict=True):
        entries = order_for_writing([(n, st, shapes[n]) for n in names])
        with ShardWriter(storage, join(url, file), entries) as w:
            for n, _, shape in entries:
                w.write(n, make(n, shape).to(dtype).reshape(shape))
                weight_map[n] = file
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(math.prod(s) for s in shapes.values()) * itemsize},
                 "weight_map": weight_map}
        storage.write_bytes(join(url, f"{stem}.safetensors.index.json"), json.dumps(index, indent=2).encode())
    if config is not None:
        storage.write_bytes(join(url, "config.json"), json.dumps(config, indent=2).encode())


def make_base(
    storage: Storage,
    url: str,
    shape: LlamaShape,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 2**62,
    tokenizer: bool = True,
) -> None:
    """Write a random Llama-shaped base model (and a small word-level tokenizer)."""
    std = 0.02

    def make(name: str, s: tuple[int, ...]) -> torch.Tensor:
        g = _generator(seed, name)
        if len(s) == 1:  # RMSNorm weights: around 1
            return 1.0 + 0.1 * torch.randn(s, generator=g)
        return std * torch.randn(s, generator=g)

    write_checkpoint(storage, url, shape.tensor_shapes(), make, dtype,
                     config=shape.config_json(dtype), max_shard_bytes=max_shard_bytes)
    storage.write_bytes(join(url, "generation_config.json"),
                        json.dumps({"bos_token_id": 1, "eos_token_id": 2}).encode())
    if tokenizer:
        write_tokenizer(storage, url, shape.vocab)


def make_finetune(
    storage: Storage,
    base_url: str,
    url: str,
    *,
    seed: int,
    density: float = 0.01,
    scale: float = 0.01,
    region: tuple[float, float] = (0.0, 1.0),
    max_shard_bytes: int = 2**62,
) -> None:
    """Write an RLVR-like fine-tune of ``base_url``: sparse updates, the rest untouched.

    Args:
        storage: where both live.
        base_url: the base checkpoint.
        url: where to write the fine-tune.
        seed: which entries change and by how much.
        density: fraction of entries updated per tensor (inside ``region``).
        scale: update size relative to the base tensor's std.
        region: the slice of each tensor's flattened entries this model updates
            (fractions in [0, 1]); disjoint regions give disjoint, orthogonal updates.
        max_shard_bytes: shard size limit.
    """
    index = open_checkpoint(storage, base_url)
    dtype = next(iter(index.tensors.values())).info.torch_dtype
    shapes = {n: r.info.shape for n, r in index.tensors.items()}

    def make(name: str, s: tuple[int, ...]) -> torch.Tensor:
        base = read_tensor(storage, index.tensors[name]).float().reshape(-1)
        g = _generator(seed, "update:" + name)
        lo, hi = int(region[0] * base.numel()), int(region[1] * base.numel())
        picked = torch.rand(hi - lo, generator=g) < density
        step = scale * max(base.std().item() if base.numel() > 1 else 0.0, 1e-3)
        delta = step * torch.randn(hi - lo, generator=g)
        # at least one bf16 ulp, so a picked entry really changes
        ulp = base[lo:hi].abs().clamp_min(1e-6) * 2**-7
        delta = torch.where(delta.abs() >= ulp, delta, torch.where(delta >= 0, ulp, -ulp))
        out = base.clone()
        out[lo:hi] += torch.where(picked, delta, torch.zeros(()))
        return out

    write_checkpoint(storage, url, shapes, make, dtype, max_shard_bytes=max_shard_bytes)
    # a fine-tune ships its config and tokenizer, as real ones do
    for extra in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if storage.exists(join(base_url, extra)):
            storage.write_bytes(join(url, extra), storage.read_bytes(join(base_url, extra)))


def write_tokenizer(storage: Storage, url: str, vocab: int) -> None:
    """A word-level tokenizer over ``vocab`` made-up words, saved as HF files."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    storage.write_bytes(join(url, "tokenizer.json"), tok.to_str().encode())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 512}
    storage.write_bytes(join(url, "tokenizer_config.json"), json.dumps(config, indent=2).encode())


CHAT_ROLES = ("system", "user", "assistant")
# a minimal chat template in the usual shape: a header per turn, an end-of-turn token, and the
# assistant header as the generation prompt
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def write_chat_tokenizer(storage: Storage, url: str, vocab: int, *, template: str | None = CHAT_TEMPLATE,
                         jinja_file: bool = False) -> dict[str, int]:
    """``write_tokenizer``'s words with the last four ids turned into the special tokens
    ``<|system|>``, ``<|user|>``, ``<|assistant|>`` and ``<|end|>``, and a chat template: in
    ``tokenizer_config.json`` (or ``chat_template.jinja`` with ``jinja_file``; none if ``template``
    is None). Returns the special tokens' ids; words ``wK`` keep id K + 3 for K + 3 < vocab - 4.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    specials = [f"<|{r}|>" for r in CHAT_ROLES] + ["<|end|>"]
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3 - len(specials))] + specials
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ["<unk>", "<s>", "</s>", *specials]])
    storage.write_bytes(join(url, "tokenizer.json"), tok.to_str().encode())
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                    "unk_token": "<unk>", "model_max_length": 512}
    if template is not None and not jinja_file:
        config["chat_template"] = template
    storage.write_bytes(join(url, "tokenizer_config.json"), json.dumps(config, indent=2).encode())
    if template is not None and jinja_file:
        storage.write_bytes(join(url, "chat_template.jinja"), template.encode())
    return {t: words.index(t) for t in ["<s>", *specials]}



def make_fisher(storage: Storage, model_url: str, url: str, *, seed: int, num_examples: int = 8,
                zero_fraction: float = 0.1) -> None:
    """Write random Fisher statistics for ``model_url`` in the Fisher stage's format.

    Sums over ``num_examples`` of squared gradients are stood in for by positive random values
    (a ``zero_fraction`` of entries exactly 0, as for parameters no example touches), so merges
    that need statistics can be tested without running the Fisher stage.
    """
    from sar_dist.fisher.plan import FORMAT_VERSION, MANIFEST

    index = open_checkpoint(storage, model_url)
    shapes = {n: r.info.shape for n, r in index.tensors.items()}
    sumsq = 0.0

    def make(name: str, s: tuple[int, ...]) -> torch.Tensor:
        nonlocal sumsq
        g = _generator(seed, "fisher:" + name)
        values = torch.rand(s, generator=g).square() * num_examples
        values[torch.rand(s, generator=g) < zero_fraction] = 0.0
        sumsq += float((values.double() / num_examples).square().sum())
        return values

    write_checkpoint(storage, url, shapes, make, torch.float32, stem="fisher", max_shard_bytes=2**62)
    manifest = {"format_version": FORMAT_VERSION, "kind": "sar-dist fisher statistics (synthetic)",
                "model": {"url": model_url, "fingerprint": index.fingerprint(),
                          "content_fingerprint": content_fingerprint(storage, index)}, "estimator": "synthetic",
                "num_examples": num_examples, "l2_norm_mean": math.sqrt(sumsq)}
    storage.write_bytes(join(url, MANIFEST), json.dumps(manifest, indent=2).encode())
