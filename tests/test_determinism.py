"""Results do not depend on torch's thread count (executors run with different counts)."""

from __future__ import annotations

import pytest
import torch

from sar_dist.merge.base import TensorContext
from sar_dist.merge.methods.trim import magnitude_sparsify
from sar_dist.merge.ops import masked_rescale, topk_magnitude_mask
from sar_dist.merge.registry import get_method
from sar_dist.plan.params import resolve


def _inputs(numel: int = 2**22):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(numel // 512, 512, generator=g)
    models = []
    for _ in range(3):
        d = torch.randn(base.shape, generator=g) * (torch.rand(base.shape, generator=g) < 0.3)
        models.append(base + 0.01 * d)
    return base, models


@pytest.mark.parametrize("method, params", [
    ("dare_linear", {"weight": 1.0, "density": 0.5}),
    ("ties", {"weight": 1.0, "density": 0.1, "rescale": True}),
    ("della", {"weight": 1.0, "density": 0.5}),
    ("slerp", {"t": 0.3}),
    ("breadcrumbs", {"weight": 1.0, "density": 0.2}),
])
def test_thread_count_does_not_change_bits(method, params):
    base, models = _inputs()
    m = get_method(method)
    models = models[:1] if method == "slerp" else models
    p = resolve(m, "model.layers.0.mlp.up_proj.weight", 0.0, params, [{}] * len(models))
    ctx = TensorContext(name="model.layers.0.mlp.up_proj.weight", seed=3)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = m.fn(models, base, p, ctx=ctx)
        torch.set_num_threads(2)
        two = m.fn(models, base, p, ctx=ctx)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one, two)


def test_sparse_fast_path_equals_full_selection():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(1000, 64, generator=g) * (torch.rand(1000, 64, generator=g) < 0.02)
    for density, rescale in [(0.5, True), (0.5, False), (0.03, True)]:
        k = max(1, int(density * d.numel()))
        slow = masked_rescale(d, topk_magnitude_mask(d, k), rescale)
        assert torch.equal(magnitude_sparsify(d, density, rescale), slow)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_kept", [0, 2**22])  # 0 forces the radix passes over row blocks
def test_trim_in_row_blocks_equals_whole(monkeypatch, dtype, max_kept):
    from sar_dist.merge.methods import trim

    monkeypatch.setattr(trim, "MAX_KEPT_MAGNITUDES", max_kept)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(300, 40, generator=g).to(dtype)
    models = [base + (0.01 * torch.randn(300, 40, generator=g) * (torch.rand(300, 40, generator=g) < 0.2)).to(dtype)
              for _ in range(2)]
    models[1][:50] = base[:50] + 0.01  # many equal magnitudes: the tie-break crosses blocks
    whole = trim.TrimState((0.05, 0.03), True, base.numel(), dtype, "cpu").run(models, base)
    expected = [whole.sparsify(m - base, i) for i, m in enumerate(models)]
    state = trim.TrimState((0.05, 0.03), True, base.numel(), dtype, "cpu")
    blocks = [(r, min(300, r + 37)) for r in range(0, 300, 37)]
    while state.needs_pass():
        for r0, r1 in blocks:
            state.observe([m[r0:r1] for m in models], base[r0:r1])
        state.end_pass()
    for i, m in enumerate(models):
        got = torch.cat([state.sparsify(m[r0:r1] - base[r0:r1], i) for r0, r1 in blocks])
        assert torch.equal(got, expected[i])
        assert int((got != 0).sum()) == max(1, int((0.05, 0.03)[i] * base.numel()))
