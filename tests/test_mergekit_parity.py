"""Our methods against mergekit 0.1.5 itself (installed as a test dependency), on the same tensors.

Deterministic methods must give the same bits in float32 and bf16. mergekit breaks magnitude ties by
argsort order and we by index, so inputs for magnitude-based methods have distinct nonzero delta
magnitudes (a zero base for bf16; exact zeros tie, but a zero entry contributes 0 whichever is kept).
Random methods draw from a different stream, so only their distributions are compared.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.merge_methods.generalized_task_arithmetic import get_mask  # noqa: E402
from mergekit.merge_methods.slerp import slerp as mk_slerp  # noqa: E402
from mergekit.sparsify import RescaleNorm, sparsify  # noqa: E402

from sar_dist.merge import ops  # noqa: E402
from sar_dist.merge.base import TensorContext  # noqa: E402
from sar_dist.merge.methods.trim import magnitude_outliers_sparsify, magnitude_sparsify  # noqa: E402
from sar_dist.merge.registry import METHODS  # noqa: E402

CTX = TensorContext(name="model.layers.1.self_attn.q_proj.weight", seed=3)
SHAPE = (24, 20)
MAGNITUDE = {"ties", "breadcrumbs", "breadcrumbs_ties"}
DETERMINISTIC = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "ram", "ramplus_tl", "linear", "slerp"]
VALUES = {"weight": [1.0, 0.6, 0.3], "density": [0.5, 0.3, 0.7], "gamma": [0.05, 0.02, 0.1], "epsilon": [0.1, 0.1, 0.1]}


def distinct_deltas(g: torch.Generator, sparse: bool) -> torch.Tensor:
    """Deltas with pairwise distinct bf16-representable magnitudes, random signs; 70% zeros if sparse."""
    numel = SHAPE[0] * SHAPE[1]
    bits = (torch.randperm(0x3F00 - 0x3A00, generator=g)[:numel] + 0x3A00).to(torch.int16)
    d = bits.view(torch.bfloat16).float().view(SHAPE)
    d = d * torch.where(torch.rand(SHAPE, generator=g) < 0.5, -1.0, 1.0)
    return torch.where(torch.rand(SHAPE, generator=g) < 0.3, d, 0.0) if sparse else d


def make_inputs(num_models: int, dtype: torch.dtype, zero_base: bool, sparse: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(SHAPE) if zero_base else torch.randn(SHAPE, generator=g)
    models = [(base + distinct_deltas(g, sparse)).to(dtype) for _ in range(num_models)]
    return base.to(dtype), models


def params_for(name: str, num_models: int, settings: dict):
    """The same settings as our params object and as mergekit's parameter dict (yaml names)."""
    mk_names = {p.name for p in mk_registry.get(name).spec.parameters}
    mk_params, ours = {}, {}
    for f in dataclasses.fields(METHODS[name].params_cls):
        yaml = f.metadata["yaml"]
        assert yaml in mk_names, f"{name}: mergekit has no parameter {yaml}"
        if yaml in settings:
            value = settings[yaml]
        elif f.metadata["per_model"]:
            value = VALUES[yaml][:num_models]
        elif yaml == "t":
            value = 0.3
        else:
            continue  # both sides use their default
        mk_params[yaml] = value
        ours[f.name] = tuple(value) if isinstance(value, list) else value
    return METHODS[name].params_cls(**ours), mk_params


def run_both(name: str, tensors, base, settings: dict, ctx: TensorContext = CTX):
    p, mk_params = params_for(name, len(tensors), settings)
    if METHODS[name].needs_base:
        group = TensorGroup.from_tensors([base, *tensors], base_index=0)
        ours = METHODS[name].fn(tensors, base, p, ctx=ctx)
    else:
        group = TensorGroup.from_tensors(tensors)
        ours = METHODS[name].fn(tensors, None, p, ctx=ctx)
    (theirs,) = mk_registry.get(name)([group], parameters=mk_params)
    return ours, theirs


SETTINGS = {
    "default": {},
    "flipped": {"normalize": True, "rescale": True, "lambda": 0.7, "int8_mask": True},
    "plain": {"normalize": False, "rescale": False},
}


@pytest.mark.parametrize("sparse", [True, False], ids=["rlvr", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_methods_bitwise_equal(name, dtype, sparse):
    num_models = 1 if name == "slerp" else 3
    spec = {p.name for p in mk_registry.get(name).spec.parameters}
    for label, settings in SETTINGS.items():
        settings = {k: v for k, v in settings.items() if k in spec}
        if label != "default" and not settings:
            continue
        # bf16 deltas of a random base tie in magnitude; mergekit's argsort order is not ours there.
        for zero_base in [True] if (dtype == torch.bfloat16 and name in MAGNITUDE) else [True, False]:
            base, tensors = make_inputs(num_models, dtype, zero_base, sparse)
            ours, theirs = run_both(name, tensors, base, settings)
            assert ours.dtype == dtype
            # mergekit's ramplus_tl returns float32 for bf16 inputs (a float32 boost factor promotes);
            # ours casts back to the input dtype, which equals mergekit followed by out_dtype=bf16.
            torch.testing.assert_close(ours, theirs.to(dtype), rtol=0, atol=0, msg=f"{name} {label} {zero_base}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rescale", [False, True])
def test_sparsify_kernels_match(dtype, rescale):
    g = torch.Generator().manual_seed(1)
    norm = RescaleNorm.l1 if rescale else None
    for sparse in (True, False):
        d = distinct_deltas(g, sparse).to(dtype)
        for density in (0.0, 0.001, 0.2, 0.5, 0.99, 1.0):
            theirs = sparsify(d, density, "magnitude", rescale_norm=norm)
            assert torch.equal(magnitude_sparsify(d, density, rescale), theirs)
            for gamma in (0.0, 0.01, 0.1, 0.9):
                theirs = sparsify(d, density, "magnitude_outliers", gamma=gamma, rescale_norm=norm)
                assert torch.equal(magnitude_outliers_sparsify(d, density, gamma, rescale), theirs)


def test_sign_election_matches_get_mask():
    g = torch.Generator().manual_seed(2)
    wd = torch.randn(4, 50, 30, generator=g) * (torch.rand(4, 50, 30, generator=g) < 0.4)
    wd[:, 0, :4] = torch.tensor([1.0, -1.0, 0.0, 0.0]).view(4, 1)  # an exact zero sum elects +
    assert torch.equal(ops.sign_consensus_mask(wd), get_mask(wd, "sum"))


@pytest.mark.parametrize("collinear", [False, True])
def test_slerp_kernel_matches(collinear):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2**20 + 300, generator=g)  # more than one 2**20 chunk
    model = 1.5 * base if collinear else torch.randn(base.shape, generator=g)
    for t in (0.0, 0.25, 0.8, 1.0):
        theirs = mk_slerp(torch.tensor([t]), base.unsqueeze(0), model.unsqueeze(0)).squeeze(0)
        ours = METHODS["slerp"].fn([model], base, METHODS["slerp"].params_cls(t=t), ctx=CTX)
        assert torch.equal(ours, theirs)


# --------------------------------------------------------------------------- random methods: distributions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dare_drop_distribution_matches(dtype):
    d = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(5)).to(dtype)
    torch.manual_seed(0)  # mergekit draws from the global RNG
    for density in (0.1, 0.6):
        theirs = sparsify(d, density, "random", rescale_norm=RescaleNorm.l1)
        ours = ops.random_sparsify(d, density, True, ctx=CTX, model_index=0)
        assert ours.dtype == theirs.dtype == dtype
        tol = 5 * math.sqrt(density * (1 - density) / d.numel())
        for out in (ours, theirs):
            assert abs(float((out != 0).double().mean()) - density) < tol + 0.002 * (dtype == torch.bfloat16)
            # L1 rescale: the kept entries carry the whole L1 norm (to the dtype's precision).
            torch.testing.assert_close(out.double().abs().sum(), d.double().abs().sum(), rtol=1e-2, atol=0)


def test_della_keep_probability_by_rank_matches():
    d = torch.randn(500, 2000, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(0)
    density, eps = 0.4, 0.15
    theirs = sparsify(d, density, "della_magprune", epsilon=eps) != 0
    ours = ops.della_sparsify(d, density, eps, False, ctx=CTX, model_index=0) != 0
    rank = d.abs().argsort(dim=1).argsort(dim=1)
    for lo in range(0, 2000, 400):
        bucket = (rank >= lo) & (rank < lo + 400)
        expected = density - eps + 2 * eps * (lo + 199.5) / 1999
        for kept in (ours, theirs):
            assert abs(float(kept[bucket].double().mean()) - expected) < 0.005


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_merged_statistics_match(name):
    base, tensors = make_inputs(3, torch.float32, zero_base=False, sparse=False, seed=7)
    big = [torch.cat([x] * 200) for x in tensors]  # 96k entries: stable statistics
    big_base = torch.cat([base] * 200)
    torch.manual_seed(0)
    ours, theirs = run_both(name, big, big_base, {})
    scale = float((theirs - big_base).abs().mean())
    stats = {
        "l1": lambda x: (x - big_base).abs().mean() / scale,
        "mean": lambda x: (x - big_base).mean() / scale,  # near 0: compared on the L1 scale
        "changed": lambda x: (x != big_base).double().mean(),
    }
    for label, stat in stats.items():
        a, b = float(stat(ours)), float(stat(theirs))
        assert abs(a - b) < 0.03, (name, label, a, b)
