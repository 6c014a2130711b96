"""Row-chunked merges of the methods with whole-tensor statistics give the whole-tensor bits.

Breadcrumbs (two magnitude thresholds per model), DELLA (rescale norms; its ranks are per row),
slerp (chunk norms and dot of the flattened tensors) and RAM+ (per-model overlap counts) gather
their statistics in passes over row blocks (``MergeMethod.state``). Two levels: the state driven
here over blocks of several sizes, as ``execute/shard.py`` drives it, and a whole merge planned
under a tiny memory budget through the local executor, compared byte for byte.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sar_dist.config import MergeJob
from sar_dist.execute.run import execute, prepare
from sar_dist.merge import ops
from sar_dist.merge.base import TensorContext
from sar_dist.merge.methods import trim
from sar_dist.merge.registry import METHODS
from sar_dist.plan.planner import build_plan
from sar_dist.storage import Storage
from sar_dist.synthetic import make_finetune
from tests.conftest import tree_bytes

CTX = TensorContext(name="model.layers.1.mlp.down_proj.weight", seed=11)
CHUNKED = ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "slerp", "ramplus_tl"]


# --------------------------------------------------------------------------- method level


def make_inputs(shape, num_models: int, dtype: torch.dtype, seed: int = 0, density: float = 0.3):
    """A base and RLVR-like models (sparse updates, most entries bitwise equal to the base), with
    runs of equal magnitudes so magnitude thresholds have ties that cross row blocks."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(num_models):
        d = 0.02 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < density)
        models.append(base + d)
    flat = models[-1].view(-1)
    flat[: flat.numel() // 6] = base.view(-1)[: flat.numel() // 6] + 0.01  # ties across blocks
    return base.to(dtype), [m.to(dtype) for m in models]


def params(name: str, num_models: int, **values):
    """The method's params: defaults, per-model values from ``values`` (one number for all models)."""
    kwargs = {}
    for f in dataclasses.fields(METHODS[name].params_cls):
        yaml = f.metadata["yaml"]
        value = values.get(yaml, f.metadata["default"])
        kwargs[f.name] = (value,) * num_models if f.metadata["per_model"] else value
    return METHODS[name].params_cls(**kwargs)


def merge_in_blocks(name: str, tensors, base, p, rows_per_block: int) -> torch.Tensor:
    """Gather the state over row blocks, then merge block by block (what ``execute/shard.py`` does)."""
    method = METHODS[name]
    rows, row_elems = base.shape[0], math.prod(base.shape[1:])
    blocks = [(r, min(rows, r + rows_per_block)) for r in range(0, rows, rows_per_block)]

    def ctx(r0: int) -> TensorContext:
        return dataclasses.replace(CTX, offset=r0 * row_elems)

    state = method.state(p, base.numel(), base.dtype, base.device)
    while state.needs_pass():
        for r0, r1 in blocks:
            state.observe([x[r0:r1] for x in tensors], base[r0:r1], ctx(r0))
        state.end_pass()
    return torch.cat([method.fn([x[r0:r1] for x in tensors], base[r0:r1], p, ctx=ctx(r0), state=state)
                      for r0, r1 in blocks])


def assert_blocks_equal_whole(name, tensors, base, p, block_sizes=(1, 3, 17, 1000)):
    whole = METHODS[name].fn(tensors, base, p, ctx=CTX)
    for rows_per_block in block_sizes:
        got = merge_in_blocks(name, tensors, base, p, rows_per_block)
        assert got.dtype == whole.dtype
        # bitwise, signed zeros included
        assert torch.equal(got.view(-1).view(torch.uint8), whole.view(-1).view(torch.uint8)), (name, rows_per_block)
    return whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("max_kept", [0, 2**22], ids=["radix", "kept"])  # 0 forces the radix passes
@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("density, gamma, rescale", [
    (0.05, 0.02, False),  # both thresholds fall inside the nonzero entries
    (0.05, 0.02, True),   # ... and the L1 rescale norms in a further pass
    (0.5, 0.05, True),    # the band reaches past the nonzero entries: only the outlier threshold
    (0.1, 0.9, False),    # more outliers than fit: the density holds, fewer are dropped
    (0.0, 0.1, True),     # nothing kept
])
def test_breadcrumbs_in_blocks(monkeypatch, name, dtype, max_kept, density, gamma, rescale):
    monkeypatch.setattr(trim, "MAX_KEPT_MAGNITUDES", max_kept)
    base, tensors = make_inputs((60, 40), 3, dtype)
    p = params(name, 3, density=density, gamma=gamma, weight=0.7, rescale=rescale)
    assert_blocks_equal_whole(name, tensors, base, p)


def two_mask_band(d: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """An independent reference for breadcrumbs: the band as the top ``num_hi`` magnitudes minus the
    top ``num_lo`` (two whole-tensor top-k masks, no passes, no shortcut for zeros)."""
    if density >= 1:
        return d
    num_hi, num_lo = ops.outlier_band(d.numel(), density, gamma)
    mask = ops.topk_magnitude_mask(d, num_hi)
    if num_lo > 0:
        mask &= ~ops.topk_magnitude_mask(d, num_lo)
    return ops.masked_rescale(d, mask, rescale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sparse", [True, False], ids=["rlvr", "dense"])
def test_breadcrumbs_state_equals_whole_kernel(dtype, sparse):
    """The state (what the method runs, whole or in blocks) keeps the bits of two plain top-k masks,
    the construction ``test_mergekit_parity`` holds to mergekit."""
    g = torch.Generator().manual_seed(3)
    d = (torch.randn(50, 30, generator=g) * (torch.rand(50, 30, generator=g) < (0.1 if sparse else 1.0))).to(dtype)
    d[0, :10] = -d[0, :10]  # negative zeros among the zeros
    for density in (0.0, 0.001, 0.02, 0.09, 0.2, 0.5, 0.99):
        for gamma in (0.0, 0.01, 0.1, 0.9):
            for rescale in (False, True):
                state = trim.OutlierState((density,), (gamma,), rescale, d.numel(), dtype, "cpu").run_deltas([d])
                expected = two_mask_band(d, density, gamma, rescale)
                got = state.sparsify(d, 0)
                assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), (density, gamma, rescale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(60, 40), (12, 8, 5)], ids=["2d", "3d"])  # ranks along dim 1
@pytest.mark.parametrize("rescale", [True, False])
def test_della_in_blocks(name, dtype, shape, rescale):
    base, tensors = make_inputs(shape, 3, dtype, density=0.6)
    p = params(name, 3, density=0.4, epsilon=0.15, weight=0.8, rescale=rescale)
    whole = assert_blocks_equal_whole(name, tensors, base, p)
    assert not torch.equal(whole, base)
    # without rescale a block of whole rows needs no statistic: the state makes no pass
    assert METHODS[name].state(p, base.numel(), dtype, "cpu").needs_pass() is rescale


def test_della_is_not_elementwise_but_chunkable():
    """DELLA ranks within a row (dim 1): a block of rows of a >= 2-D tensor is exact, but a 1-D
    tensor is one row, and the planner cuts the 1-D tensors of `elementwise` methods as well, so
    DELLA is chunked through its state (which the planner uses for >= 2-D tensors only)."""
    for name in ("della", "della_linear"):
        method = METHODS[name]
        assert not method.elementwise(params(name, 2, density=0.5, rescale=False))
        assert method.elementwise(params(name, 2, density=1.0))
        assert method.state is not None
    one_row = torch.arange(1.0, 4097.0)  # ranks 0..4095 in the whole row, 0..2047 twice in halves
    kept = ops.della_keep_mask(one_row, 0.5, 0.2, ctx=CTX, model_index=0)
    halves = torch.cat([ops.della_keep_mask(one_row[:2048], 0.5, 0.2, ctx=CTX, model_index=0),
                        ops.della_keep_mask(one_row[2048:], 0.5, 0.2, ctx=dataclasses.replace(CTX, offset=2048),
                                            model_index=0)])
    assert not torch.equal(kept, halves)  # why a 1-D tensor must stay whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("shape", [(60, 40), (2200, 1000)], ids=["one-chunk", "three-chunks"])
def test_slerp_in_blocks(dtype, shape):
    """Row blocks that end inside, exactly on, and far past the 2**20-element reduction chunks."""
    base, tensors = make_inputs(shape, 1, dtype, density=1.0)
    tensors = [tensors[0] * 0.5 + 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(dtype)]
    p = params("slerp", 1, t=0.3)
    sizes = (1, 7, 1048, 1049, 1500, 3000) if shape[0] > 100 else (1, 3, 17, 1000)
    whole = assert_blocks_equal_whole("slerp", tensors, base, p, sizes)
    assert not torch.equal(whole, ((1 - 0.3) * base.double() + 0.3 * tensors[0].double()).to(dtype))  # not a lerp


def test_slerp_collinear_in_blocks():
    base = torch.randn(90, 30)
    assert_blocks_equal_whole("slerp", [2 * base], base, params("slerp", 1, t=0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ramplus_tl_in_blocks(dtype):
    base, tensors = make_inputs((60, 40), 3, dtype)
    p = params("ramplus_tl", 3, r=0.3, alpha=0.5)
    whole = assert_blocks_equal_whole("ramplus_tl", tensors, base, p)
    # the boost differs from RAM's plain keep: the whole-tensor counts matter
    assert not torch.equal(whole, METHODS["ram"].fn(tensors, base, params("ram", 3), ctx=CTX))


# --------------------------------------------------------------------------- through the planner and executor


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> dict[str, str]:
    """``tiny_models`` plus a model far from the base (every entry moved by about the base's std,
    an angle near 45 degrees): an RLVR fine-tune is nearly collinear with its base, where slerp
    falls back to a lerp that needs no statistic."""
    other = str(tmp_path_factory.mktemp("other") / "model")
    make_finetune(Storage(), tiny_models["base"], other, seed=5, density=1.0, scale=1.0, max_shard_bytes=30_000)
    return {**tiny_models, "other": other}


def _job(models: dict[str, str], out: str, method: str, parameters: dict, dtype: str) -> MergeJob:
    """Three RLVR-like fine-tunes of a bf16 base (slerp: another model), computed and written in ``dtype``."""
    if method == "slerp":  # mergekit style: the base is listed among the models
        entries = [{"model": models["base"]}, {"model": models["other"]}]
    else:
        entries = [{"model": models[k]} for k in ("ft1", "ft2", "ft3")]
    d = {"merge_method": method, "base_model": models["base"], "models": entries, "output": out, "seed": 7,
         "parameters": parameters, "dtype": dtype}
    return MergeJob.from_dict(d, where="test")


def _shard_files(out: str) -> dict[str, bytes]:
    return {k: v for k, v in tree_bytes(out).items() if k.endswith(".safetensors") or k.endswith("index.json")}


@pytest.mark.parametrize("method, parameters, dtype", [
    ("breadcrumbs", {"density": 0.02, "gamma": 0.01, "weight": 0.9}, "float32"),  # two thresholds inside the updates
    ("breadcrumbs", {"density": 0.02, "gamma": 0.01, "weight": 1.0, "rescale": True}, "bfloat16"),
    ("breadcrumbs_ties", {"density": 0.03, "gamma": 0.02, "weight": 1.0}, "float32"),
    ("della", {"density": 0.5, "epsilon": 0.1, "weight": 1.0}, "float32"),  # rescale norms in a pass
    ("della_linear", {"density": 0.4, "epsilon": 0.2, "weight": 0.8}, "bfloat16"),
    ("della_linear", {"density": 0.4, "epsilon": 0.2, "weight": 0.8, "rescale": False}, "float32"),  # no pass
    ("slerp", {"t": 0.3}, "float32"),
    ("slerp", {"t": 0.7}, "bfloat16"),
    ("ramplus_tl", {"r": 0.3, "alpha": 0.5}, "float32"),
    ("ramplus_tl", {"r": 0.3, "alpha": 0.5}, "bfloat16"),
])
def test_chunked_merge_writes_whole_bytes(tmp_path, models, method, parameters, dtype):
    whole, chunked = str(tmp_path / "whole"), str(tmp_path / "chunked")
    plan = build_plan(_job(models, chunked, method, parameters, dtype), memory_budget=6_000)
    assert not plan.warnings
    assert sum(j.chunk_rows < j.shape[0] for t in plan.tasks for j in t.tensors if j.shape) >= 15
    execute(prepare(plan), executor="local")
    execute(prepare(build_plan(_job(models, whole, method, parameters, dtype))), executor="local")
    assert _shard_files(whole) == _shard_files(chunked)


def test_chunked_breadcrumbs_radix_passes(tmp_path, models, monkeypatch):
    """No nonzero magnitudes kept: both thresholds by radix passes over the row blocks."""
    monkeypatch.setattr(trim, "MAX_KEPT_MAGNITUDES", 0)
    parameters = {"density": 0.02, "gamma": 0.01, "weight": 1.0}
    whole, chunked = str(tmp_path / "whole"), str(tmp_path / "chunked")
    execute(prepare(build_plan(_job(models, chunked, "breadcrumbs_ties", parameters, "float32"),
                               memory_budget=6_000)), executor="local")
    execute(prepare(build_plan(_job(models, whole, "breadcrumbs_ties", parameters, "float32"))), executor="local")
    assert _shard_files(whole) == _shard_files(chunked)


@pytest.mark.parametrize("name", CHUNKED)
def test_registered_as_chunkable(name):
    assert METHODS[name].state is not None
