"""The task-arithmetic family on the changed entries only (``generalized_task_arithmetic(sparse=)``)
against its dense formula, bit for bit: TIES, DARE and Model Breadcrumbs, with and without sign
election, on sparse updates with planted ties, signed zeros, inf and NaN, mixed-sign and zero weights,
every compute dtype, and from 1 to 5 models (5 takes the dense formula); the random masks held
from DARE's norms pass; and the per-row L1 sums gathered block by block into one vector."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sar_dist.execute.blocks import merge_row_blocks, observe_blocks
from sar_dist.merge.base import TensorContext
from sar_dist.merge.methods.task_arithmetic import generalized_task_arithmetic
from sar_dist.merge.registry import METHODS
from tests.test_chunked_methods import params
from tests.test_sar import _same_bits, _sparse_inputs

CTX = TensorContext(name="model.layers.0.mlp.up_proj.weight", seed=3, offset=0)

SHAPES = {1: (1,), 1023: (3, 341), 3073: (7, 439)}

# method -> (elect, YAML values of one case per entry)
CASES = {
    "ties": (True, [{"density": 0.3}, {"density": 1.0}, {"density": 0.3, "rescale": True, "normalize": False}]),
    "dare_ties": (True, [{"density": 0.5}, {"density": 0.5, "rescale": False}]),
    "dare_linear": (False, [{"density": 0.5}, {"density": 0.5, "normalize": True}]),
    "breadcrumbs": (False, [{"density": 0.6, "gamma": 0.05}, {"density": 0.6, "gamma": 0.05, "normalize": True,
                                                              "rescale": True}]),
    "breadcrumbs_ties": (True, [{"density": 0.6, "gamma": 0.05}]),
}


def _dense(name: str, elect: bool, models, base, p):
    """The preset's merge with the dense formula (``sparse=None``) and a fresh state."""
    method = METHODS[name]
    state = method.state(p, base.numel(), base.dtype, base.device)
    if name.startswith("dare"):
        state.run(models, base, CTX)
        return generalized_task_arithmetic(models, base, p, sparsify=lambda d, i: state.sparsify(d, i, CTX),
                                           elect=elect)
    state.run(models, base)
    return generalized_task_arithmetic(models, base, p, sparsify=state.sparsify, elect=elect)


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", list(CASES))
def test_changed_entries_merge_is_the_dense_formula(name, compute):
    elect, cases = CASES[name]
    for k in range(1, 6):
        mixed = (-0.5, 0.0, 1.5, 1.0, -2.0)[:k]
        for values in cases:
            for weights, lam in (((1.0,) * k, 1.0), (mixed, -0.7)):
                p = dataclasses.replace(params(name, k, **values), weights=weights, lambda_=lam)
                for numel, density in ((1, 1.0), (1023, 0.05), (1023, 1.0), (3073, 0.05), (3073, 0.5)):
                    special = numel == 3073 and density == 0.5
                    base, models, _ = _sparse_inputs(k, numel, density, compute, seed=numel + k, special=special)
                    base, models = base.view(SHAPES[numel]), [x.view(SHAPES[numel]) for x in models]
                    want = _dense(name, elect, [x.clone() for x in models], base.clone(), p)
                    got = METHODS[name].fn(models, base, p, ctx=CTX)
                    assert _same_bits(got, want), (name, compute, k, values, weights, numel, density)


def test_dare_holds_the_norms_pass_masks_for_the_merge():
    """A tensor held in memory: the merge takes each block's masks from the norms pass (no second
    draw of the random stream) and gives the bits of a merge that draws them again."""
    method = METHODS["dare_ties"]
    k, rows, cols, step = 3, 40, 300, 7
    base, models, _ = _sparse_inputs(k, rows * cols, 0.05, torch.float32, seed=5)
    base, models = base.view(rows, cols), [x.view(rows, cols) for x in models]
    p = params("dare_ties", k, weight=1.0, density=0.5)

    def merged(hold: bool) -> torch.Tensor:
        state = method.state(p, base.numel(), torch.float32, "cpu")
        if hold:
            state.hold_masks()
        kw = {"has_base": True, "num_inputs": k, "fisher_scale": (), "ctx": CTX, "compute_dtype": torch.float32,
              "device": "cpu", "step": step}
        while state.needs_pass():
            observe_blocks(state, [base, *models], **kw)
            state.end_pass()
        assert (state._held is not None) == hold
        return merge_row_blocks(method, p, [base, *models], state, out_dtype=torch.float32, **kw)

    assert torch.equal(merged(True).view(torch.int32), merged(False).view(torch.int32))
    want = method.fn(models, base, p, ctx=CTX)
    assert torch.equal(merged(True).view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("shape,step", [((37, 29), 5), ((300,), 64), ((6, 0), 4), ((), 1)])
def test_row_sums_in_blocks_are_the_whole_tensor_row_l1(shape, step):
    """``ops.RowSums`` filled block by block (sized at the first block, grown where it cannot tell
    the row count) holds exactly the whole tensor's per-row L1 sums."""
    from sar_dist.merge import ops
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 1e-3
    sums = ops.RowSums(x.numel())
    blocks = [x] if x.dim() == 0 else [x[r0:r0 + step] for r0 in range(0, x.shape[0], step)]
    for block in blocks:
        ops.row_l1(block, out=sums.slot(block))
    (got,) = sums.pieces()
    assert torch.equal(got, ops.row_l1(x))
