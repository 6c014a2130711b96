"""SAR-Merging and Fisher merging against references written here from docs/methods.md's definitions,
on sparse task vectors with planted overlaps and sign conflicts; chunked == whole; the merge stage
end to end with Fisher statistics, and its refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sar_dist.cli import main as cli_main
from sar_dist.config import MergeJob
from sar_dist.execute.run import execute, prepare
from sar_dist.merge.base import TensorContext
from sar_dist.merge.methods.ram import RamParams, ram
from sar_dist.merge.methods.sar import FisherParams, SarParams, SarState, fisher, sar
from sar_dist.plan.planner import build_plan
from sar_dist.storage import Storage
from sar_dist.synthetic import make_fisher
from tests.conftest import load_safetensors_dir

CTX = TensorContext(name="model.layers.0.mlp.up_proj.weight")


def planted(num_models: int = 3, shape=(24, 16), seed: int = 0, density: float = 0.2):
    """Base, models with sparse updates (some entries shared, some with opposite signs), Fisher."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models, fishers = [], []
    shared = torch.rand(shape, generator=g) < 0.1  # entries several models update
    for k in range(num_models):
        own = torch.rand(shape, generator=g) < density
        mask = own | shared
        delta = torch.randn(shape, generator=g) * 0.1
        if k == 1:  # model 1 flips the sign on half of the shared entries: conflicts
            flip = shared & (torch.rand(shape, generator=g) < 0.5)
            delta = torch.where(flip, -delta.abs(), delta)
        models.append(base + delta * mask)
        fishers.append(torch.rand(shape, generator=g) + 0.01)
    return base, models, fishers


def reference_sar(base, models, fishers, *, weights=None, eps=0.0, arbitration="sensitivity", density=1.0,
                  rescale="l1", lam=1.0):
    """Entry by entry, as docs/methods.md writes it (float64)."""
    k = len(models)
    weights = weights or [1.0] * k
    t = [((m.double() - base.double()) * w).reshape(-1) for m, w in zip(models, weights, strict=True)]
    f = [x.double().reshape(-1) for x in fishers]
    u = torch.zeros_like(t[0])
    for i in range(u.numel()):
        ups = [j for j in range(k) if abs(t[j][i]) > eps]
        if not ups:
            continue
        if len(ups) == 1:
            u[i] = t[ups[0]][i]
            continue
        mean = sum(f[j][i] * t[j][i] for j in ups) / sum(f[j][i] for j in ups)
        signs = {bool(t[j][i] > 0) for j in ups}
        if arbitration == "fisher_mean" or (arbitration == "sensitivity" and len(signs) == 1):
            u[i] = mean
        elif arbitration == "sensitivity":
            u[i] = t[max(ups, key=lambda j: (f[j][i] * t[j][i] ** 2, -j))][i]
        else:  # fisher_elect
            s = math.copysign(1.0, sum(f[j][i] * t[j][i] for j in ups))
            agree = [j for j in ups if math.copysign(1.0, t[j][i]) == s]
            u[i] = sum(f[j][i] * t[j][i] for j in agree) / sum(f[j][i] for j in agree) if agree else 0.0
    if density < 1:
        nz = (u != 0).nonzero().squeeze(1)
        keep = round(density * nz.numel())
        order = sorted(nz.tolist(), key=lambda i: (-abs(float(u[i])), i))[:keep]
        kept = torch.zeros_like(u)
        kept[order] = u[order]
        if rescale == "l1":
            kept *= u.abs().sum() / kept.abs().sum()
        elif rescale == "l2":
            kept *= u.norm() / kept.norm()
        u = kept
    return base.double() + lam * u.reshape(base.shape)


def _params(**kw) -> SarParams:
    return SarParams(weights=kw.pop("weights", (1.0, 1.0, 1.0)), **kw)


@pytest.mark.parametrize("arbitration", ["sensitivity", "fisher_mean", "fisher_elect"])
@pytest.mark.parametrize("density,rescale", [(1.0, "l1"), (0.3, "l1"), (0.5, "l2"), (0.4, "none")])
def test_sar_matches_reference(arbitration, density, rescale):
    base, models, fishers = planted()
    p = _params(arbitration=arbitration, density=density, rescale=rescale, lam=0.9, weights=(1.0, 0.8, 1.2))
    got = sar(models, base, p, ctx=CTX, fisher=fishers)
    ref = reference_sar(base, models, fishers, arbitration=arbitration, density=density, rescale=rescale, lam=0.9,
                        weights=[1.0, 0.8, 1.2])
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_sar_semantics_on_planted_entries():
    base = torch.zeros(6)
    a = torch.tensor([0.5, 0.0, 0.2, 0.3, -0.4, 0.0])
    b = torch.tensor([0.0, -0.7, 0.6, -0.1, 0.4, 0.0])
    fa = torch.tensor([1.0, 1.0, 1.0, 1.0, 9.0, 1.0])
    fb = torch.tensor([1.0, 1.0, 3.0, 1.0, 1.0, 1.0])
    out = sar([a, b], base, SarParams(weights=(1.0, 1.0)), ctx=CTX, fisher=[fa, fb])
    assert out[0] == 0.5 and out[1] == -0.7  # exclusive updates pass whole
    assert out[2] == pytest.approx((1 * 0.2 + 3 * 0.6) / 4)  # agreeing overlap: Fisher mean
    assert out[3] == 0.3  # conflict: s_a = 0.09 > s_b = 0.01
    assert out[4] == -0.4  # conflict: s_a = 9 * 0.16 > s_b = 0.16
    assert out[5] == 0.0


def test_sar_identities():
    base, models, fishers = planted(num_models=3)
    one = sar(models[:1], base, SarParams(weights=(1.0,)), ctx=CTX, fisher=fishers[:1])
    assert torch.equal(one, models[0])  # one model in: its own update comes out
    # disjoint updates, density 1: the sum of the updates
    g = torch.Generator().manual_seed(1)
    slots = torch.randint(0, 4, base.shape, generator=g)  # 3 = nobody
    deltas = [torch.randn(base.shape, generator=g) * (slots == k) for k in range(3)]
    out = sar([base + d for d in deltas], base, _params(), ctx=CTX, fisher=fishers)
    torch.testing.assert_close(out, base + sum(deltas), rtol=0, atol=1e-6)
    # sparsification keeps exactly round(density * n) entries and the L1 norm of the update
    out = sar(models, base, _params(density=0.25), ctx=CTX, fisher=fishers)
    full = sar(models, base, _params(), ctx=CTX, fisher=fishers)
    n = int((full != base).sum())
    assert int((out != base).sum()) == round(0.25 * n)
    assert float((out - base).abs().sum()) == pytest.approx(float((full - base).abs().sum()), rel=1e-5)


def test_sar_with_equal_fisher_and_no_conflicts_equals_ram():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(32, 8, generator=g)
    # overlapping updates that agree in sign
    models = [base + (torch.rand(32, 8, generator=g) < 0.3) * torch.rand(32, 8, generator=g) * 0.1 for _ in range(3)]
    ones = [torch.ones_like(base)] * 3
    got = sar(models, base, _params(eps=1e-5), ctx=CTX, fisher=ones)
    want = ram(models, base, RamParams(epsilon=1e-5), ctx=CTX)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_fisher_merge_reference():
    _, models, fishers = planted()
    fishers[2][0, 0] = 0.0
    got = fisher(models, None, FisherParams(weights=(1.0, 2.0, 0.5)), ctx=CTX, fisher=fishers)
    w = [1.0, 2.0, 0.5]
    f = [x.clamp_min(1e-30) for x in fishers]
    want = sum(wk * fk * m for wk, fk, m in zip(w, f, models, strict=True)) / sum(wk * fk for wk, fk in zip(w, f, strict=True))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rows", [1, 5, 7])
def test_sar_in_row_blocks_is_bit_identical(rows):
    base, models, fishers = planted(shape=(23, 16))
    p = _params(density=0.3, rescale="l1")
    whole = sar(models, base, p, ctx=CTX, fisher=fishers)
    state = SarState(p, base.numel(), base.dtype, "cpu")
    blocks = [(r, min(r + rows, 23)) for r in range(0, 23, rows)]
    while state.needs_pass():
        for r0, r1 in blocks:
            state.observe([m[r0:r1] for m in models], base[r0:r1], fisher=[f[r0:r1] for f in fishers])
        state.end_pass()
    pieces = [sar([m[r0:r1] for m in models], base[r0:r1], p, ctx=CTX, fisher=[f[r0:r1] for f in fishers], state=state)
              for r0, r1 in blocks]
    assert torch.equal(torch.cat(pieces), whole)


@pytest.fixture(scope="module")
def fisher_dirs(tiny_models, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stats")
    storage = Storage()
    out = {}
    for i, name in enumerate(("ft1", "ft2", "ft3")):
        out[name] = str(root / name)
        make_fisher(storage, tiny_models[name], out[name], seed=i, num_examples=4 + i)
    return out


def _sar_job(tiny_models, fisher_dirs, out: str, **params) -> MergeJob:
    out_dtype = params.pop("out_dtype", None)
    return MergeJob.from_dict({
        "merge_method": "sar",
        "base_model": tiny_models["base"],
        "models": [{"model": tiny_models[k], "fisher": fisher_dirs[k]} for k in ("ft1", "ft2", "ft3")],
        "parameters": {"density": 0.5, **params},
        "dtype": "float32",
        "output": out,
        **({"out_dtype": out_dtype} if out_dtype else {}),
    })


def test_chunked_merge_equals_whole_through_the_executor(tmp_path, tiny_models, fisher_dirs):
    outs = {}
    for name, budget in (("whole", 2**30), ("chunked", 6_000)):
        job = _sar_job(tiny_models, fisher_dirs, str(tmp_path / name))
        plan = build_plan(job, memory_budget=budget)
        if name == "chunked":
            assert any(0 < t.chunk_rows < t.shape[0] for s in plan.tasks for t in s.tensors if t.shape)
        execute(prepare(plan), executor="local")
        outs[name] = load_safetensors_dir(tmp_path / name)
    assert outs["whole"].keys() == outs["chunked"].keys()
    for k in outs["whole"]:
        assert torch.equal(outs["whole"][k], outs["chunked"][k]), k


def test_held_update_equals_passes_over_the_sources(tmp_path, tiny_models, fisher_dirs):
    """A chunked SAR tensor whose update fits half the budget is merged from that update held in
    memory (each source chunk read once; ``TensorJob.cache_update``); one that does not fit takes
    the passes over the sources. Both give the whole-tensor bits."""
    whole = None
    kinds = set()
    for budget in (2**30, 6_000, 30_000, 100_000, 300_000):
        job = _sar_job(tiny_models, fisher_dirs, str(tmp_path / f"b{budget}"))
        plan = build_plan(job, memory_budget=budget)
        for t in (t for s in plan.tasks for t in s.tensors if t.shape and 0 < t.chunk_rows < t.shape[0]):
            kinds.add("held" if t.cache_update else "passes")
            assert not t.cache_update or 2 * t.update_bytes <= budget
        execute(prepare(plan), executor="local")
        got = load_safetensors_dir(tmp_path / f"b{budget}")
        if whole is None:
            whole = got
            continue
        assert got.keys() == whole.keys()
        for k in whole:
            assert torch.equal(got[k], whole[k]), (budget, k)
    assert kinds == {"held", "passes"}


def test_merge_stage_applies_fisher_scaling(tmp_path, tiny_models, fisher_dirs):
    """The executor hands the method F = sum / num_examples / l2_norm_mean (fisher_norm: l2)."""
    job = _sar_job(tiny_models, fisher_dirs, str(tmp_path / "o"), density=1.0, arbitration="fisher_mean",
                   out_dtype="float32")
    execute(prepare(build_plan(job)), executor="local")
    got = load_safetensors_dir(tmp_path / "o")
    name = "model.layers.1.mlp.down_proj.weight"
    base = load_safetensors_dir(tiny_models["base"])[name].float()
    models = [load_safetensors_dir(tiny_models[k])[name].float() for k in ("ft1", "ft2", "ft3")]
    import json

    fishers = []
    for k in ("ft1", "ft2", "ft3"):
        meta = json.loads(Path(fisher_dirs[k], "fisher.json").read_text())
        fishers.append(load_safetensors_dir(fisher_dirs[k])[name] / meta["num_examples"] / meta["l2_norm_mean"])
    want = reference_sar(base, models, fishers, arbitration="fisher_mean")
    torch.testing.assert_close(got[name].double(), want, rtol=1e-6, atol=1e-7)
    unscaled = reference_sar(base, models, [load_safetensors_dir(fisher_dirs[k])[name] for k in ("ft1", "ft2", "ft3")],
                             arbitration="fisher_mean")
    assert not torch.allclose(got[name].double(), unscaled, rtol=1e-6, atol=1e-7)  # the scaling matters here


def test_sar_refuses_statistics_of_another_model(tmp_path, tiny_models, fisher_dirs, capsys):
    import yaml

    cfg = {
        "merge_method": "sar", "base_model": tiny_models["base"], "output": str(tmp_path / "out"),
        "models": [{"model": tiny_models["ft1"], "fisher": fisher_dirs["ft2"]},
                   {"model": tiny_models["ft2"], "fisher": fisher_dirs["ft2"]}],
    }
    path = tmp_path / "sar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["merge", str(path), "--executor", "local"]) == 2
    err = capsys.readouterr().err
    assert "computed for model" in err and "ft2" in err and "ft1" in err
    assert not (tmp_path / "out").exists()
    cfg["models"][0].pop("fisher")
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["merge", str(path), "--executor", "local"]) == 2
    assert "needs 'fisher:' statistics for 'sar'" in capsys.readouterr().err
    cfg["models"][0]["fisher"] = fisher_dirs["ft1"]
    cfg["parameters"] = {"arbitration": "vote"}
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["merge", str(path), "--executor", "local"]) == 2
    assert "'vote' is not one of sensitivity" in capsys.readouterr().err


def _old_sar_update(tensors, base, p, fisher):
    """sar_update as it was before the sparse path (commit 37e8715), kept as the bit reference."""
    t = torch.stack([(x - base).mul_(w) for x, w in zip(tensors, p.weights, strict=True)])
    m = t.abs() > p.eps
    t.mul_(m)
    f = torch.stack([fk.clamp_min(p.fisher_floor) for fk in fisher]) * m
    count = m.sum(dim=0)
    ft = f * t
    sum_ft = ft.sum(dim=0)
    sum_f = f.sum(dim=0)
    mean = torch.where(count > 0, sum_ft / torch.where(sum_f > 0, sum_f, torch.ones_like(sum_f)), torch.zeros_like(sum_f))
    if p.arbitration == "fisher_mean":
        update = mean
    elif p.arbitration == "fisher_elect":
        elected = torch.sign(sum_ft)
        agree = m & (torch.sign(t) == elected)
        fa = f * agree
        den = fa.sum(dim=0)
        update = torch.where(den > 0, (fa * t).sum(dim=0) / torch.where(den > 0, den, torch.ones_like(den)),
                             torch.zeros_like(den))
    else:
        positive = ((t > 0) & m).sum(dim=0)
        negative = ((t < 0) & m).sum(dim=0)
        conflict = (positive > 0) & (negative > 0)
        s = torch.where(m, f * t * t, torch.full_like(t, -1.0))
        winner = s.argmax(dim=0, keepdim=True)
        strongest = t.gather(0, winner).squeeze(0)
        update = torch.where(conflict, strongest, mean)
    return torch.where(count == 1, t.sum(dim=0), update)


_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _same_bits(got, want) -> bool:
    """Bit-identical, except that a NaN (from NaN or infinite inputs) may carry another sign or payload."""
    nan = want.isnan()
    bits = _BITS[want.dtype]
    return (got.dtype == want.dtype and torch.equal(got.isnan(), nan)
            and torch.equal(got[~nan].view(bits), want[~nan].view(bits)))


def _sparse_inputs(k: int, numel: int, density: float, dtype, seed: int, special: bool = False):
    """Base, k models changing about ``density`` of the entries, raw Fisher; with planted exact ties
    (two models with equal t and F, and with opposite t), a zero Fisher, and -0.0 / +0.0 bases."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g).to(dtype)
    base[::11] = -0.0
    base[1::11] = 0.0
    models, fishers = [], []
    for _ in range(k):
        delta = torch.randn(numel, generator=g) * torch.logspace(-4, -1, numel)
        changed = torch.rand(numel, generator=g) < density
        models.append(torch.where(changed, (base.double() + delta).to(dtype), base))
        fishers.append(torch.rand(numel, generator=g).to(dtype))
    fishers[0][::7] = 0.0
    if k >= 2:
        models[1][2::5] = models[0][2::5]  # equal t, equal F: an exact tie in s
        fishers[1][2::5] = fishers[0][2::5]
        models[1][3::5] = (2 * base[3::5].double() - models[0][3::5].double()).to(dtype)  # about -t_0
        fishers[1][3::5] = fishers[0][3::5]
        models[0][::13] = 0.0  # +0.0 against a -0.0 base
    if special:
        base[5::97] = float("inf")
        models[0][6::89] = float("nan")
        models[-1][7::83] = float("-inf")
    return base, models, fishers


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("arbitration", ["sensitivity", "fisher_mean", "fisher_elect"])
def test_sparse_sar_update_is_bit_identical_to_the_dense_formulas(compute, arbitration):
    from sar_dist.merge.methods.sar import sar_update
    for k in range(1, 7):
        mixed = tuple((-0.5, 0.0, 1.5, 1.0, -2.0, 0.25)[:k])  # negative and zero weights
        for weights, eps, floor in (((1.0,) * k, 0.0, 1e-30), (mixed, 1e-3, 0.0)):
            p = SarParams(weights=weights, eps=eps, fisher_floor=floor, arbitration=arbitration)
            cases = [(n, d) for n in (1, 1023, 3073) for d in (0.0, 0.05, 0.5, 1.0)] + [(65537, 0.05)]
            for numel, density in cases:
                special = numel == 3073 and density == 0.5
                base, models, fishers = _sparse_inputs(k, numel, density, compute, seed=numel + k, special=special)
                want = _old_sar_update([x.clone() for x in models], base, p, fishers)
                got = sar_update(models, base, p, fishers)
                assert _same_bits(got, want), (k, weights, eps, numel, density)
                if numel != 3073 or density != 0.05:
                    continue
                # and sar's base + lambda * update, whole and density < 1
                for density_kept in (1.0, 0.5):
                    q = SarParams(weights=weights, eps=eps, fisher_floor=floor, arbitration=arbitration,
                                  density=density_kept, lam=1.5)
                    out = sar(models, base, q, ctx=CTX, fisher=fishers)
                    u = _old_sar_update([x.clone() for x in models], base, q, fishers)
                    ref = base + SarState(q, u.numel(), u.dtype, "cpu").run(u).sparsify(u).mul_(q.lam)
                    assert _same_bits(out, ref), (k, numel, density, density_kept)
