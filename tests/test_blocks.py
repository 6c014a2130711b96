"""Elementwise merges in cache-sized flat blocks (``sar_dist.execute.blocks``) give the bits of
the method on the whole unit: every elementwise method and preset, 1 to 5 models, float32 and
bfloat16 compute, sizes that leave a short last block (down to one entry), and a keyed-random
method whose blocks are then whole random blocks."""

from __future__ import annotations

import pytest
import torch

from sar_dist.execute.blocks import merge_blocks, merge_row_blocks, merge_via_update, observe_blocks
from sar_dist.merge.base import TensorContext
from sar_dist.merge.registry import METHODS
from tests.test_chunked_methods import make_inputs, params

CTX = TensorContext(name="model.layers.0.mlp.up_proj.weight", seed=5, offset=0)
CASES = [
    ("linear", {"weight": 0.5}),
    ("task_arithmetic", {"weight": 0.7}),
    ("ties", {"weight": 1.0, "density": 1.0}),
    ("dare_linear", {"weight": 1.0, "density": 0.6, "rescale": False}),
    ("ram", {}),
    ("sar", {}),
    ("sar", {"arbitration": "fisher_elect", "eps": 1e-3}),
    ("sar", {"arbitration": "fisher_mean", "weight": -0.5, "lambda": 1.5}),
    ("fisher", {}),
]


def _whole(name, p, base, models, fisher, compute, out_dtype):
    """The unit merged whole: inputs converted to the compute dtype, the method's fn, the output cast."""
    m = METHODS[name]
    kwargs = {"fisher": [f.to(compute) * 0.25 for f in fisher]} if fisher else {}
    b = base.to(compute)
    return m.fn([x.to(compute) for x in models], b if m.needs_base else None, p, ctx=CTX, **kwargs).to(out_dtype)


@pytest.mark.parametrize("name,values", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("num_models", [1, 2, 3, 5])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_blocks_equal_whole(name, values, num_models, compute):
    method = METHODS[name]
    if num_models < method.min_models or (method.max_models and num_models > method.max_models):
        pytest.skip("model count outside the method's range")
    p = params(name, num_models, **values)
    assert method.elementwise(p)
    for numel in (1, 1023, 1024 * 3 + 1, 1024 * 5 + 517):
        base, models = make_inputs((numel,), num_models, torch.bfloat16, seed=numel)
        fisher = ([torch.rand(numel, generator=torch.Generator().manual_seed(i)) for i in range(num_models)]
                  if method.needs_fisher else [])
        if fisher:
            fisher[0][::7] = 0.0
        raw = ([base] if method.needs_base else []) + [*models, *fisher]  # as the planner orders sources
        got = merge_blocks(method, p, list(raw), has_base=method.needs_base, num_inputs=num_models,
                           fisher_scale=(0.25,) * len(fisher), ctx=CTX, compute_dtype=compute,
                           out_dtype=torch.bfloat16, device="cpu", block=1024)
        want = _whole(name, p, base, models, fisher, compute, torch.bfloat16)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (name, num_models, numel)


def test_keyed_random_blocks_are_whole_random_blocks():
    """DARE draws keyed random numbers per 2**20-entry block; a unit spanning two of them and a
    block size below that still gives the whole unit's bits."""
    method = METHODS["dare_linear"]
    p = params("dare_linear", 2, weight=1.0, density=0.5, rescale=False)
    numel = 2**20 + 3001
    base, models = make_inputs((numel,), 2, torch.bfloat16, seed=1)
    ctx = TensorContext(name=CTX.name, seed=CTX.seed, offset=4096)
    got = merge_blocks(method, p, [base, *models], has_base=True, num_inputs=2, fisher_scale=(), ctx=ctx,
                       compute_dtype=torch.float32, out_dtype=torch.bfloat16, device="cpu", block=1024)
    want = method.fn([x.float() for x in models], base.float(), p, ctx=ctx).to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


STATEFUL_CASES = [
    ("ties", {"weight": 1.0, "density": 0.3}),
    ("dare_ties", {"weight": 1.0, "density": 0.5}),
    ("breadcrumbs", {"weight": 1.0, "density": 0.6, "gamma": 0.05}),
    ("della", {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
    ("slerp", {"t": 0.3}),
    ("ramplus_tl", {}),
    ("sar", {"density": 0.5}),
    ("sar", {"density": 0.3, "rescale": "l2", "arbitration": "fisher_elect"}),
    ("sar", {"density": 1.0}),
]


@pytest.mark.parametrize("name,values", STATEFUL_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(STATEFUL_CASES)])
@pytest.mark.parametrize("shape", [(37, 29), (5, 3, 7), (300,)])
def test_row_blocks_equal_whole(name, values, shape):
    """A method with whole-tensor statistics, merged from a unit in memory as the executor does it:
    the state's passes over row blocks (over the update computed once, for ``sar``), then the merge
    block by block, gives the bits of the method on the whole tensor. Blocks of 4 rows (and of 1)
    leave a short last block."""
    method = METHODS[name]
    num_models = method.max_models or 3
    p = params(name, num_models, **values)
    base, models = make_inputs(shape, num_models, torch.bfloat16, seed=len(shape))
    fisher = ([torch.rand(shape, generator=torch.Generator().manual_seed(i)) for i in range(num_models)]
              if method.needs_fisher else [])
    raw = [base, *models, *fisher]
    want = _whole(name, p, base, models, fisher, torch.float32, torch.bfloat16)
    ctx = TensorContext(name=CTX.name, seed=CTX.seed, offset=0)
    kw = dict(num_inputs=num_models, fisher_scale=(0.25,) * len(fisher), ctx=ctx, compute_dtype=torch.float32,
              device="cpu")
    for step in ((4, 1) if len(shape) > 1 else (shape[0],)):
        if method.update is not None:
            got = merge_via_update(method, p, raw, None, out_dtype=torch.bfloat16, step=step,
                                   **{k: v for k, v in kw.items() if k != "ctx"})
        else:
            state = method.state(p, base.numel(), torch.float32, "cpu")
            while state.needs_pass():
                observe_blocks(state, raw, has_base=True, step=step, **kw)
                state.end_pass()
            got = merge_row_blocks(method, p, raw, state, has_base=True, out_dtype=torch.bfloat16, step=step, **kw)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (name, shape, step)


@pytest.mark.parametrize("weights,normalize,lam", [
    ((0.7,), False, 1.0),
    ((1.0, -0.3), True, 1.0),
    ((0.3, 0.3, 0.4), True, 1.5),
    ((0.5, -0.5, 1e-9, 2.0), True, -0.7),  # a weight sum below 1e-8 is not used as a divisor
    ((0.5, -0.5), True, 0.3),
])
def test_task_arithmetic_kernel_is_the_method(weights, normalize, lam):
    """The fused task_arithmetic block kernel gives the bits of ``fn`` on the block, including signed
    zeros and, where the job allows them, infinities and NaN."""
    method = METHODS["task_arithmetic"]
    n = len(weights)
    p = params("task_arithmetic", n, weight=1.0)
    p = type(p)(weights=weights, densities=p.densities, lambda_=lam, normalize=normalize)
    base, models = make_inputs((4099,), n, torch.float32, seed=n)
    base[:5] = torch.tensor([0.0, -0.0, float("inf"), float("nan"), -0.0])
    models[0][5:9] = torch.tensor([-0.0, float("-inf"), 3.0, -0.0])
    kernel = method.kernel(p, n, torch.float32, "cpu")
    assert kernel is not None
    for stop in (4099, 1024, 1):
        got = kernel([base[:stop], *[m[:stop] for m in models]], CTX)
        want = method.fn([m[:stop] for m in models], base[:stop], p, ctx=CTX)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (weights, stop)
    assert method.kernel(p, n, torch.bfloat16, "cpu") is None  # other dtypes keep fn
