"""Every merge method against a naive reference written from docs/methods.md, plus identities and kernels."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sar_dist.merge import ops
from sar_dist.merge.base import REQUIRED, MergeMethod, TensorContext
from sar_dist.merge.methods.trim import magnitude_outliers_sparsify, magnitude_sparsify
from sar_dist.merge.registry import METHODS

CTX = TensorContext(name="model.layers.0.mlp.up_proj.weight", seed=7)
GTA = {
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
}
# the mergekit methods of docs/methods.md; sar and fisher (which take Fisher statistics) are held to
# their own references in tests/test_sar.py
BASELINES = sorted(n for n, m in METHODS.items() if not m.needs_fisher)
ELECT = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
PER_MODEL = {
    "weight": (1.0, 0.6, 0.3),
    "density": (0.5, 0.3, 0.7),
    "gamma": (0.05, 0.02, 0.1),
    "epsilon": (0.1, 0.05, 0.2),
}


# --------------------------------------------------------------------------- inputs and params


def make_inputs(num_models: int, kind: str, *, shape=(48, 40), dtype=torch.float32, seed: int = 0):
    """Base and models: ``rlvr`` = sparse partly overlapping updates (most entries bitwise equal to base)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(num_models):
        delta = torch.randn(shape, generator=g) * (0.02 if kind == "rlvr" else 0.1)
        if kind == "rlvr":
            delta = torch.where(torch.rand(shape, generator=g) < 0.3, delta, 0.0)
        models.append((base + delta).to(dtype))
    return base.to(dtype), models


def num_models_for(method: MergeMethod) -> int:
    return method.max_models or 3


def make_params(method: MergeMethod, num_models: int, **overrides):
    kwargs = {}
    for f in dataclasses.fields(method.params_cls):
        yaml, default = f.metadata["yaml"], f.metadata["default"]
        if f.metadata["per_model"]:
            kwargs[f.name] = PER_MODEL[yaml][:num_models]
        else:
            kwargs[f.name] = 0.3 if default is REQUIRED else default
    kwargs.update(overrides)
    return method.params_cls(**kwargs)


def call(name: str, tensors, base, p, ctx: TensorContext = CTX):
    method = METHODS[name]
    return method.fn(tensors, base if method.needs_base else None, p, ctx=ctx)


# --------------------------------------------------------------------------- naive references (float64)


def ref_rescale(d, masked, rescale):
    if not rescale:
        return masked
    before, after = d.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def desc_order(d):
    """Flattened indices by decreasing |d|, ties by index (our documented tie-break)."""
    mags = d.abs().flatten().tolist()
    return sorted(range(len(mags)), key=lambda j: (-mags[j], j))


def keep(d, indices):
    mask = torch.zeros(d.numel(), dtype=torch.bool)
    mask[list(indices)] = True
    return d * mask.view(d.shape)


def ref_magnitude(d, k, rescale):
    if k >= 1:
        return d
    if k <= 0:
        return torch.zeros_like(d)
    kk = max(1, int(k * d.numel()))
    return ref_rescale(d, keep(d, desc_order(d)[:kk]), rescale)


def ref_outliers(d, k, gamma, rescale):
    if k >= 1:
        return d
    n = d.numel()
    ascending = desc_order(d)[::-1]
    n_keep, n_top = int(k * n), int(gamma * n)
    n_bot = max(0, n - n_keep - n_top)
    return ref_rescale(d, keep(d, ascending[n_bot : n_bot + n_keep]), rescale)


def ref_random(d, k, rescale, i):
    if k >= 1:
        return d
    u = ops.keyed_uniform(CTX, i, d.numel()).view(d.shape)
    return ref_rescale(d, d * (u < k), rescale)


def ref_della(d, k, eps, rescale, i):
    if k >= 1:
        return d
    rows = d.reshape(1, -1) if d.dim() < 2 else d
    u = ops.keyed_uniform(CTX, i, d.numel()).double().view(rows.shape)
    mask = torch.zeros(rows.shape, dtype=torch.bool)
    ncols = rows.shape[1]
    for r in range(rows.shape[0]):
        mags = rows[r].abs().tolist()
        for rank, j in enumerate(sorted(range(ncols), key=lambda j: (mags[j], j))):
            mask[r, j] = u[r, j] < k - eps + 2 * eps * rank / (ncols - 1)
    return ref_rescale(d, d * mask.view(d.shape), rescale)


def ref_gta(name, tensors, base, p):
    n = len(tensors)
    deltas = [(x - base).double() for x in tensors]  # the delta in the compute dtype, then exact math
    if name in ("ties",):
        deltas = [ref_magnitude(d, p.densities[i], p.rescale) for i, d in enumerate(deltas)]
    elif name.startswith("dare"):
        deltas = [ref_random(d, p.densities[i], p.rescale, i) for i, d in enumerate(deltas)]
    elif name.startswith("breadcrumbs"):
        deltas = [ref_outliers(d, p.densities[i], p.gammas[i], p.rescale) for i, d in enumerate(deltas)]
    elif name.startswith("della"):
        deltas = [ref_della(d, p.densities[i], p.epsilons[i], p.rescale, i) for i, d in enumerate(deltas)]
    wd = [p.weights[i] * deltas[i] for i in range(n)]
    if name in ELECT:
        majority = torch.where(sum(wd) >= 0, 1.0, -1.0)
        masks = [torch.sign(x) == majority for x in wd]
        mixed = sum(wd[i] * masks[i] for i in range(n))
        divisor = sum(p.weights[i] * masks[i].double() for i in range(n))
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = sum(wd)
        divisor = sum(p.weights)
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
    if p.normalize:
        mixed = mixed / divisor
    return base.double() + p.lambda_ * mixed


def ref_ram(tensors, base, epsilon, plus=None):
    ts = [(x - base).double() for x in tensors]
    nz = [t.abs() > epsilon for t in ts]
    count = sum(m.long() for m in nz)
    unique, overlap = count == 1, count > 1
    out = base.double().clone()
    for t, m in zip(ts, nz, strict=True):
        boost = 1.0
        if plus is not None:
            r, alpha = plus
            rho = (m & overlap).sum().item() / max((m & unique).sum().item(), epsilon)
            boost = 1 + r * min(max(rho, 0.0), alpha)
        out += torch.where(m & unique, boost * t, 0.0) + torch.where(m & overlap, t / count.clamp(min=1), 0.0)
    return out


def ref_linear(tensors, p):
    total = sum(w * x.double() for w, x in zip(p.weights, tensors, strict=True))
    return total / sum(p.weights) if p.normalize else total


def ref_slerp(model, base, t):
    a, b = base.double().flatten(), model.double().flatten()
    na, nb = a.norm(), b.norm()
    dot = ((a / na if na > 1e-8 else a) * (b / nb if nb > 1e-8 else b)).sum().clamp(-1, 1).item()
    if abs(dot) > 0.9995:
        return ((1 - t) * a + t * b).view(base.shape)
    theta = math.acos(dot)
    return ((math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)).view(base.shape)


def reference(name, tensors, base, p):
    if name in GTA:
        return ref_gta(name, tensors, base, p)
    if name == "ram":
        return ref_ram(tensors, base, p.epsilon)
    if name == "ramplus_tl":
        return ref_ram(tensors, base, p.epsilon, plus=(p.r, p.alpha))
    if name == "linear":
        return ref_linear(tensors, p)
    if name == "slerp":
        return ref_slerp(tensors[0], base, p.t)
    raise AssertionError(f"no reference for {name}")


# --------------------------------------------------------------------------- method tests


def variants(name: str) -> list[dict]:
    """Default params plus, for the task-arithmetic family, normalize/rescale flipped and lambda != 1."""
    if name not in GTA:
        return [{}]
    defaults = {f.name: f.metadata["default"] for f in dataclasses.fields(METHODS[name].params_cls)}
    return [{}, {"normalize": not defaults["normalize"], "rescale": not defaults["rescale"], "lambda_": 0.8}]


@pytest.mark.parametrize("kind", ["rlvr", "dense"])
@pytest.mark.parametrize("name", BASELINES)
def test_matches_naive_reference(name, kind):
    method = METHODS[name]
    base, tensors = make_inputs(num_models_for(method), kind)
    for overrides in variants(name):
        p = make_params(method, len(tensors), **overrides)
        got = call(name, tensors, base, p)
        assert got.dtype == base.dtype and got.shape == base.shape
        torch.testing.assert_close(got.double(), reference(name, tensors, base, p), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", BASELINES)
def test_two_calls_bitwise_equal(name):
    method = METHODS[name]
    base, tensors = make_inputs(num_models_for(method), "rlvr", seed=3)
    p = make_params(method, len(tensors))
    assert torch.equal(call(name, tensors, base, p), call(name, tensors, base, p))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", BASELINES)
def test_half_precision_stays_half(name, dtype):
    method = METHODS[name]
    base, tensors = make_inputs(num_models_for(method), "rlvr", dtype=dtype)
    p = make_params(method, len(tensors))
    got = call(name, tensors, base, p)
    assert got.dtype == dtype
    # Loose check of the value: near the exact reference, except where half-precision rounding flips a
    # near-zero elected sign (sum_i w_i d_i ~ 0), which changes that entry by a whole update.
    close = torch.isclose(got.double(), reference(name, tensors, base, p), rtol=2e-2, atol=2e-2)
    assert float(close.double().mean()) > 0.995


def test_linear_weights_one_zero_returns_first():
    base, tensors = make_inputs(2, "dense")
    p = make_params(METHODS["linear"], 2, weights=(1.0, 0.0))
    assert torch.equal(call("linear", tensors, base, p), tensors[0])


def test_linear_zero_weight_sum_is_an_error():
    base, tensors = make_inputs(2, "dense")
    with pytest.raises(ValueError, match="sum to 0"):
        call("linear", tensors, base, make_params(METHODS["linear"], 2, weights=(1.0, -1.0)))
    p = make_params(METHODS["linear"], 2, weights=(1.0, -1.0), normalize=False)
    torch.testing.assert_close(call("linear", tensors, base, p), tensors[0] - tensors[1])


@pytest.mark.parametrize("kind", ["rlvr", "dense"])
def test_dare_linear_at_density_one_is_task_arithmetic(kind):
    base, tensors = make_inputs(3, kind)
    ta = call("task_arithmetic", tensors, base, make_params(METHODS["task_arithmetic"], 3))
    dare = call("dare_linear", tensors, base, make_params(METHODS["dare_linear"], 3, densities=(1.0,) * 3))
    assert torch.equal(ta, dare)


def test_ties_density_one_single_model_returns_model():
    base, tensors = make_inputs(1, "rlvr")
    p = make_params(METHODS["ties"], 1, densities=(1.0,), weights=(1.0,))
    torch.testing.assert_close(call("ties", tensors, base, p), tensors[0], rtol=0, atol=1e-6)


def test_task_arithmetic_weight_zero_returns_base():
    base, tensors = make_inputs(1, "dense")
    p = make_params(METHODS["task_arithmetic"], 1, weights=(0.0,))
    assert torch.equal(call("task_arithmetic", tensors, base, p), base)


@pytest.mark.parametrize("kind", ["rlvr", "dense"])
def test_slerp_endpoints(kind):
    base, tensors = make_inputs(1, kind)
    slerp = METHODS["slerp"]
    assert torch.equal(call("slerp", tensors, base, make_params(slerp, 1, t=0.0)), base)
    assert torch.equal(call("slerp", tensors, base, make_params(slerp, 1, t=1.0)), tensors[0])


def test_slerp_collinear_falls_back_to_lerp():
    base = torch.randn(100)
    model = 2 * base
    got = call("slerp", [model], base, make_params(METHODS["slerp"], 1, t=0.25))
    torch.testing.assert_close(got, 1.25 * base)


def test_della_density_epsilon_range_is_checked():
    base, tensors = make_inputs(1, "dense")
    p = make_params(METHODS["della"], 1, densities=(0.9,), epsilons=(0.15,))
    with pytest.raises(ValueError, match=r"della: density 0.9 \+/- epsilon 0.15"):
        call("della", tensors, base, p)


def test_random_methods_depend_on_seed_and_name():
    base, tensors = make_inputs(2, "dense")
    p = make_params(METHODS["dare_ties"], 2)
    a = call("dare_ties", tensors, base, p)
    assert not torch.equal(a, call("dare_ties", tensors, base, p, TensorContext(name=CTX.name, seed=8)))
    assert not torch.equal(a, call("dare_ties", tensors, base, p, TensorContext(name="other", seed=CTX.seed)))


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_topk_mask_exact_count_with_ties(dtype):
    g = torch.Generator().manual_seed(0)
    # Few distinct magnitudes (many ties, both signs, zeros) across several 2**20 chunks.
    x = (torch.randint(-3, 4, (3 * 2**20 + 17,), generator=g) * 0.5).to(dtype)
    order = torch.sort(x.float().abs(), descending=True, stable=True).indices
    for kk in [1, 5, 2**20 + 3, x.numel() // 2, x.numel() - 1]:
        mask = ops.topk_magnitude_mask(x, kk)
        assert mask.dtype == torch.bool and int(mask.sum()) == kk
        expected = torch.zeros(x.numel(), dtype=torch.bool)
        expected[order[:kk]] = True
        assert torch.equal(mask, expected)


def test_topk_mask_edges_and_shape():
    x = torch.randn(7, 5)
    assert not ops.topk_magnitude_mask(x, 0).any()
    assert ops.topk_magnitude_mask(x, 35).all()
    mask = ops.topk_magnitude_mask(x, 3)
    assert mask.shape == x.shape
    assert set(x.abs().flatten()[mask.flatten()].tolist()) == set(x.abs().flatten().topk(3).values.tolist())


def test_magnitude_sparsify_density_edges():
    d = torch.randn(10, 10)
    assert magnitude_sparsify(d, 1.0, rescale=True) is d
    assert not magnitude_sparsify(d, 0.0, rescale=False).any()
    assert int((magnitude_sparsify(d, 0.001, rescale=False) != 0).sum()) == 1  # at least one kept


def test_magnitude_outliers_edge_cases():
    d = torch.arange(1, 51, dtype=torch.float32)  # |d| ascending = index order
    # int(0.01 * 50) == 0 outliers: keep the 10 largest.
    got = magnitude_outliers_sparsify(d, 0.2, 0.01, rescale=False)
    assert torch.equal(got != 0, d > 40)
    # 10 kept + 45 outliers > 50: drop only 40 outliers, keep the 10 smallest.
    got = magnitude_outliers_sparsify(d, 0.2, 0.9, rescale=False)
    assert torch.equal(got != 0, d <= 10)
    # Usual case: drop 5 largest, keep the next 10.
    got = magnitude_outliers_sparsify(d, 0.2, 0.1, rescale=False)
    assert torch.equal(got != 0, (d > 35) & (d <= 45))


def test_keyed_uniform_range_matches_slices_across_blocks():
    block = ops.BLOCK_NUMEL
    full = ops.keyed_uniform(CTX, 1, 2 * block + 1000)
    assert full.dtype == torch.float32 and 0 <= float(full.min()) and float(full.max()) < 1
    for start, stop in [
        (0, 10),
        (block - 5, block + 5),
        (block - 1, 2 * block + 3),
        (2 * block + 999, 2 * block + 1000),
        (5, 5),
    ]:
        assert torch.equal(ops.keyed_uniform_range(CTX, 1, start, stop), full[start:stop])
    assert torch.equal(ops.keyed_uniform(CTX, 1, 1234), full[:1234])


def test_keyed_uniform_keys():
    a = ops.keyed_uniform(CTX, 0, 64)
    assert torch.equal(a, ops.keyed_uniform(TensorContext(name=CTX.name, seed=CTX.seed), 0, 64))
    assert not torch.equal(a, ops.keyed_uniform(CTX, 1, 64))
    assert not torch.equal(a, ops.keyed_uniform(TensorContext(name=CTX.name, seed=8), 0, 64))
    assert not torch.equal(a, ops.keyed_uniform(TensorContext(name="x", seed=CTX.seed), 0, 64))
    assert ops.block_seed(CTX, 0, 0) != ops.block_seed(CTX, 0, 1)
    assert 0 <= ops.block_seed(CTX, 0, 0) < 2**63


def test_dare_keep_fraction_and_l1():
    d = torch.randn(1000, 1000)
    for density in (0.1, 0.5, 0.9):
        kept = ops.random_sparsify(d, density, rescale=True, ctx=CTX, model_index=0)
        frac = float((kept != 0).float().mean())
        assert abs(frac - density) < 5 * math.sqrt(density * (1 - density) / d.numel())
        torch.testing.assert_close(kept.abs().sum(), d.abs().sum(), rtol=1e-4, atol=0)


def test_della_keep_fraction_rises_with_magnitude():
    d = torch.randn(1000, 1000)
    kept = ops.della_sparsify(d, 0.5, 0.2, rescale=False, ctx=CTX, model_index=0) != 0
    assert abs(float(kept.float().mean()) - 0.5) < 0.003
    rank = d.abs().argsort(dim=1).argsort(dim=1)
    low, high = float(kept[rank < 100].float().mean()), float(kept[rank >= 900].float().mean())
    assert abs(low - 0.32) < 0.01 and abs(high - 0.68) < 0.01


def test_sign_consensus_mask():
    wd = torch.tensor([[1.0, -1.0, 0.0, 2.0], [-3.0, -1.0, 0.0, -2.0]])
    expected = torch.tensor([[False, True, False, True], [True, True, False, False]])
    assert torch.equal(ops.sign_consensus_mask(wd), expected)
