"""`sar-dist analyze`: numbers against hand-computed values on planted tensors, the CLI end to end,
local vs Ray, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sar_dist.analyze import run_analyze
from sar_dist.analyze.run import FIGURES
from sar_dist.analyze.stats import module_kind, svd_rank
from sar_dist.checkpoint.index import content_fingerprint, open_checkpoint
from sar_dist.cli import main as cli_main
from sar_dist.storage import Storage
from tests.conftest import load_safetensors_dir, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.norm.weight"


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return str(path)


def _save_fisher(path: Path, model_dir: str, sums: dict[str, torch.Tensor], num_examples: int) -> str:
    """Fisher statistics in the Fisher stage's format: float32 sums + fisher.json (written last)."""
    storage = Storage()
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in sums.items()}, str(path / "fisher.safetensors"))
    index = open_checkpoint(storage, model_dir)
    manifest = {"format_version": 1, "num_examples": num_examples, "l2_norm_mean": 1.0,
                "model": {"url": model_dir, "fingerprint": index.fingerprint(),
                          "content_fingerprint": content_fingerprint(storage, index)}}
    (path / "fisher.json").write_text(json.dumps(manifest))
    return str(path)


def _flat(shape: tuple[int, ...], values: dict[int, float]) -> torch.Tensor:
    t = torch.zeros(shape).reshape(-1)
    for i, v in values.items():
        t[i] = v
    return t.reshape(shape)


# Planted task vectors on a 4x5 q_proj (N = 20) and a 4-entry norm (N = 4):
#   t_a: q_proj entries 0..5 = [1, 1, -1, 2, 1, 1]                 |A| = 6, ||t_a||^2 = 9
#   t_b: q_proj entries 3..9 = [1, -1, -2, 1, 1, 1, 1], norm[0] = 0.5   |B| = 7 + 1, ||t_b||^2 = 10.25
# A & B = {3, 4, 5} (signs: same, opposite, opposite) -> 2 sign conflicts; t_a . t_b = 2 - 1 - 2 = -1
T_A = {0: 1.0, 1: 1.0, 2: -1.0, 3: 2.0, 4: 1.0, 5: 1.0}
T_B = {3: 1.0, 4: -1.0, 5: -2.0, 6: 1.0, 7: 1.0, 8: 1.0, 9: 1.0}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("planted")
    base_q = torch.arange(20, dtype=torch.float32).reshape(4, 5) / 4  # exact in float32, ||.||^2 = 2470/16
    base_n = torch.ones(4)
    paths = {
        "base": _save(root / "base", {Q: base_q, NORM: base_n}),
        "a": _save(root / "a", {Q: base_q + _flat((4, 5), T_A), NORM: base_n}),
        "b": _save(root / "b", {Q: base_q + _flat((4, 5), T_B), NORM: base_n + _flat((4,), {0: 0.5})}),
        # another shape, and a missing tensor
        "bad_shape": _save(root / "bad_shape", {Q: torch.zeros(5, 4), NORM: base_n}),
        "bad_name": _save(root / "bad_name", {Q: base_q}),
    }
    # mean Fisher: a -> (index + 1) on q_proj, 1 on norm; b -> 0.5 everywhere (sums over 4 examples)
    paths["fa"] = _save_fisher(root / "fa", paths["a"], {Q: 4 * torch.arange(1, 21, dtype=torch.float32)
                                                         .reshape(4, 5), NORM: 4 * torch.ones(4)}, 4)
    paths["fb"] = _save_fisher(root / "fb", paths["b"], {Q: torch.full((4, 5), 2.0), NORM: torch.full((4,), 2.0)}, 4)
    return paths


def test_module_kind_and_rank():
    assert module_kind("model.layers.3.self_attn.k_proj.weight") == ("attention", "k_proj")
    assert module_kind("model.layers.3.mlp.down_proj.weight") == ("mlp", "down_proj")
    assert module_kind("model.layers.3.mlp.gate_proj.weight") == ("mlp", "gate_proj")
    assert module_kind("model.layers.3.self_attn.q_norm.weight") == ("norm", "norm")
    assert module_kind("model.layers.3.post_attention_layernorm.weight") == ("norm", "norm")
    # the input embedding and the output projection are separate groups (also when tied)
    assert module_kind("model.embed_tokens.weight") == ("embed_tokens", "embed_tokens")
    assert module_kind("lm_head.weight") == ("lm_head", "lm_head")
    assert module_kind("model.rotary.inv_freq") == ("other", "other")
    # MoE: the router (Qwen-MoE/OLMoE/DeepSeek `mlp.gate`, Mixtral `block_sparse_moe.gate`) and the experts
    # (per expert, shared, or fused by transformers) are groups of their own, apart from a dense mlp
    assert module_kind("model.layers.3.mlp.gate.weight") == ("router", "router")
    assert module_kind("model.layers.3.block_sparse_moe.gate.weight") == ("router", "router")
    assert module_kind("model.layers.3.mlp.router.weight") == ("router", "router")
    assert module_kind("model.layers.3.mlp.shared_expert_gate.weight") == ("router", "router")
    assert module_kind("model.layers.3.mlp.experts.7.down_proj.weight") == ("experts", "experts.down_proj")
    assert module_kind("model.layers.3.block_sparse_moe.experts.0.w1.weight") == ("experts", "experts.w1")
    assert module_kind("model.layers.3.mlp.experts.gate_up_proj") == ("experts", "experts.gate_up_proj")
    assert module_kind("model.layers.3.mlp.shared_expert.up_proj.weight") == ("experts", "shared_experts.up_proj")
    assert svd_rank((4096, 11008), 0.01) == 41 and svd_rank((8, 6), 0.01) == 1 and svd_rank((8, 6), 1 / 3) == 2


def test_planted_counts_overlap_signs_cosine_and_fisher(tmp_path, planted):
    rep = run_analyze(planted["base"], [planted["a"], planted["b"]], str(tmp_path / "out"),
                      fisher=[planted["fa"], planted["fb"]], executor="local")
    base_norm = math.sqrt(2470 / 16 + 4)
    ov = rep["overall"]
    a, b = ov["models"]
    assert ov["numel"] == 24 and rep["num_tensors"] == 2
    assert (a["updated"], b["updated"]) == (6, 8)
    assert a["density"] == pytest.approx(6 / 24, abs=1e-15) and a["sparsity"] == pytest.approx(18 / 24, abs=1e-15)
    assert b["density"] == pytest.approx(8 / 24, abs=1e-15)
    assert a["update_norm"] == pytest.approx(3.0, rel=1e-12)
    assert a["relative_norm"] == pytest.approx(3.0 / base_norm, rel=1e-12)
    assert b["relative_norm"] == pytest.approx(math.sqrt(10.25) / base_norm, rel=1e-12)
    assert (a["updated_in_overlap"], b["updated_in_overlap"]) == (3, 3)
    # Fisher: a: sum (i+1) t_a^2 = 1+2+3+16+5+6 = 33, in the overlap {3,4,5}: 16+5+6 = 27
    #         b: 0.5 * 10.25 = 5.125, in the overlap: 0.5 * (1+1+4) = 3
    assert a["fisher_sensitivity"] == pytest.approx(33.0, rel=1e-12)
    assert a["fisher_overlap_share"] == pytest.approx(27 / 33, rel=1e-12)
    assert b["fisher_overlap_share"] == pytest.approx(3 / 5.125, rel=1e-12)

    (pair,) = ov["pairs"]
    n, p, q = 24, 6 / 24, 8 / 24
    assert (pair["intersection"], pair["union"], pair["sign_conflicts"]) == (3, 11, 2)
    assert pair["jaccard"] == pytest.approx(3 / 11, rel=1e-12)
    assert pair["jaccard_chance"] == pytest.approx(p * q / (p + q - p * q), rel=1e-12)
    assert pair["overlap_over_smaller"] == pytest.approx(3 / 6, rel=1e-12)
    assert pair["overlap_over_smaller_chance"] == pytest.approx(q, rel=1e-12)  # pq / min(p, q)
    assert pair["expected_intersection"] == pytest.approx(n * p * q, rel=1e-12)  # = 2.0
    assert pair["intersection_vs_chance"] == pytest.approx(1.5, rel=1e-12)
    assert pair["expected_intersection_per_tensor"] == pytest.approx(6 * 7 / 20 + 0, rel=1e-12)
    assert pair["sign_conflict_rate"] == pytest.approx(2 / 3, rel=1e-12)
    assert pair["cosine"] == pytest.approx(-1 / math.sqrt(9 * 10.25), rel=1e-12)

    # per module: the q_proj alone (N = 20: p = 0.3, q = 0.35), the norm alone; per layer: only layer 0
    att = rep["per_module"]["attention"]
    assert att["numel"] == 20 and att["pairs"][0]["jaccard"] == pytest.approx(3 / 10, rel=1e-12)
    assert att["pairs"][0]["jaccard_chance"] == pytest.approx(0.105 / 0.545, rel=1e-12)
    assert att["pairs"][0]["cosine"] == pytest.approx(-1 / math.sqrt(90), rel=1e-12)
    norm = rep["per_module"]["norm"]
    assert [m["updated"] for m in norm["models"]] == [0, 1] and norm["pairs"][0]["cosine"] is None
    assert norm["pairs"][0]["jaccard"] == 0 and norm["pairs"][0]["sign_conflict_rate"] is None
    assert [entry["layer"] for entry in rep["per_layer"]] == [0]
    assert rep["per_layer"][0]["models"][1]["updated"] == 7
    by_name = {t["name"]: t for t in rep["per_tensor"]}
    assert by_name[Q]["svd"] == {"method": "exact", "rank": 1, "q": 4} and by_name[NORM]["svd"] is None
    assert by_name[NORM]["models"][0]["off_principal_share"] is None  # 1-D: not defined
    assert by_name[NORM]["models"][0]["relative_norm"] == 0.0

    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["overall"] == rep["overall"] and written["inputs"]["fisher"] == [planted["fa"], planted["fb"]]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| a / b | 0.2727 | " in md and "66.7% (2 of 3)" in md


def test_tolerance(tmp_path):
    base = torch.arange(10, dtype=torch.float32)
    t = _flat((10,), {0: 1e-3, 1: -1e-3, 2: 0.5})
    b = _save(tmp_path / "base", {"w": base})
    m = _save(tmp_path / "m", {"w": base + t})
    r0 = run_analyze(b, [m], str(tmp_path / "o0"), executor="local")
    r1 = run_analyze(b, [m], str(tmp_path / "o1"), executor="local", tolerance=0.01)
    assert r0["overall"]["models"][0]["updated"] == 3 and r1["overall"]["models"][0]["updated"] == 1
    assert r1["overall"]["pairs"] == [] and r1["settings"]["tolerance"] == 0.01
    assert set(p.name for p in (tmp_path / "o1").iterdir()) == {"report.json", "report.md", *FIGURES}


def test_off_principal_share(tmp_path):
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    s = torch.tensor([10.0, 5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    w = u[:, :6] @ torch.diag(s) @ v.T
    m_in = torch.randn(2, 2, generator=g, dtype=torch.float64)
    m_out = torch.randn(4, 4, generator=g, dtype=torch.float64)
    t_in = u[:, :2] @ m_in @ v[:, :2].T  # inside the rank-2 principal block
    t_out = u[:, 2:6] @ m_out @ v[:, 2:6].T  # orthogonal to it on both sides
    name = "model.layers.0.mlp.down_proj.weight"
    base = _save(tmp_path / "base", {name: w.float()})
    models = [_save(tmp_path / k, {name: (w + t).float()}) for k, t in
              (("in", t_in), ("out", t_out), ("mix", t_in + t_out))]
    # the stored updates, as the analysis sees them (float32 values minus float32 base)
    stored = [(load_safetensors_dir(mdir)[name] - w.float()).double() for mdir in models]
    expected_mix = stored[2].sub(u[:, :2] @ (u[:, :2].T @ stored[2] @ v[:, :2]) @ v[:, :2].T).square().sum()
    expected_mix = float(expected_mix / stored[2].square().sum())
    assert 0.05 < expected_mix < 0.95
    shares = {}
    for mode in ("auto", "randomized"):
        rep = run_analyze(base, models, str(tmp_path / mode), executor="local", rank_fraction=1 / 3, svd=mode)
        shares[mode] = [m["off_principal_share"] for m in rep["overall"]["models"]]
        assert rep["per_tensor"][0]["svd"]["method"] == ("exact" if mode == "auto" else "randomized")
        assert rep["per_tensor"][0]["svd"]["rank"] == 2 and rep["settings"]["svd_counts"] == {
            rep["per_tensor"][0]["svd"]["method"]: 1}
        assert shares[mode][0] == pytest.approx(0.0, abs=1e-6)
        assert shares[mode][1] == pytest.approx(1.0, abs=1e-6)
        assert shares[mode][2] == pytest.approx(expected_mix, rel=1e-5)
        assert rep["per_layer"][0]["models"][2]["off_principal_share"] == shares[mode][2]
    assert shares["auto"] == pytest.approx(shares["randomized"], abs=1e-6)


def test_cli_end_to_end(tmp_path, tiny_models):
    out = tmp_path / "report"
    r = run_cli("analyze", "--base", tiny_models["base"], "--model", tiny_models["ft1"], "--model",
                tiny_models["ft2"], "--model", tiny_models["ft3"], "--output", str(out), "--executor", "local",
                "--json")
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", *FIGURES}
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    rep = json.loads((out / "report.json").read_text())
    assert printed["overall"] == rep["overall"] and rep["settings"]["svd_counts"] == {"exact": 16}
    assert [entry["layer"] for entry in rep["per_layer"]] == [0, 1]
    assert list(rep["per_module"]) == ["embed_tokens", "lm_head", "attention", "mlp", "norm"]
    # counts against a direct computation from the tensors
    base = load_safetensors_dir(tiny_models["base"])
    fts = [load_safetensors_dir(tiny_models[k]) for k in ("ft1", "ft2", "ft3")]
    masks = [torch.cat([(ft[n].float() != b.float()).reshape(-1) for n, b in base.items()]) for ft in fts]
    assert [m["updated"] for m in rep["overall"]["models"]] == [int(m.sum()) for m in masks]
    assert rep["overall"]["pairs"][0]["intersection"] == int((masks[0] & masks[1]).sum())
    deltas = [torch.cat([(ft[n].double() - b.double()).reshape(-1) for n, b in base.items()]) for ft in fts]
    cos = float(deltas[1] @ deltas[2] / (deltas[1].norm() * deltas[2].norm()))
    assert rep["overall"]["pairs"][2]["cosine"] == pytest.approx(cos, rel=1e-6)
    md = (out / "report.md").read_text()
    assert "## Per model" in md and "ft1 / ft2" in md and "## Reading" in md


def test_local_and_ray_give_the_same_numbers(tmp_path, tiny_models, ray_local, monkeypatch):
    import sar_dist.analyze.run as run_mod

    models = [tiny_models["ft1"], tiny_models["ft2"]]
    local = run_analyze(tiny_models["base"], models, str(tmp_path / "local"), executor="local")
    monkeypatch.setattr(run_mod, "GROUP_BYTES", 50_000)  # several tasks, small tensors grouped
    ray_rep = run_analyze(tiny_models["base"], models, str(tmp_path / "ray"), executor="ray")
    assert ray_local.is_initialized()  # the fixture's Ray was used, not shut down
    assert ray_rep["settings"]["executor"] == "ray" and 3 < ray_rep["settings"]["tasks"] < 21
    assert local["settings"]["tasks"] == 1
    for key in ("overall", "per_module", "per_kind", "per_layer", "per_tensor"):
        assert ray_rep[key] == local[key], key


def _cli(*args: str) -> int:
    return cli_main(["analyze", *args, "--executor", "local"])


def test_bad_input_exits_2_and_writes_nothing(tmp_path, planted, capsys, monkeypatch):
    import sar_dist.analyze.stats as stats_mod

    def no_data(*a, **k):
        raise AssertionError("tensor data read during validation")

    monkeypatch.setattr(stats_mod, "read_tensor", no_data)
    out = tmp_path / "out"
    p = planted
    cases = [
        (["--base", p["base"], "--model", str(tmp_path / "nope")], "no such directory"),
        (["--base", p["base"], "--model", p["a"], "--model", p["bad_shape"]], "has shape [5, 4]"),
        (["--base", p["base"], "--model", p["bad_name"]], f"missing tensor '{NORM}' (present in the base)"),
        (["--base", p["base"], "--model", p["a"], "--model", p["b"], "--fisher", p["fa"]], "--fisher given 1"),
        (["--base", p["base"], "--model", p["a"], "--model", p["b"], "--fisher", p["fb"], "--fisher", p["fa"]],
         "were computed for model"),
        (["--base", p["base"], "--model", p["a"], "--rank-fraction", "0"], "--rank-fraction"),
        (["--base", p["base"], "--model", p["a"], "--storage-options", '{"secret": "x"}'], "credential"),
    ]
    for args, message in cases:
        assert _cli(*args, "--output", str(out)) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("sar-dist: error: ") and message in err and "\n" not in err, err
        assert not out.exists()
    with pytest.raises(ValueError, match="has shape"):
        run_analyze(p["base"], [p["bad_shape"]], str(out), executor="local")
    assert not out.exists()


# --------------------------------------------------------------------------- the report's reading
# In-process on synthetic sufficient statistics (what tensor_stats returns): no files, no tensors.


def _raw(name: str, shape: tuple[int, ...], updated: list[int], *, sumsq: list[float] | None = None,
         inside: list[float] | None = None, pairs: dict[tuple[int, int], tuple[int, int, float]] | None = None
         ) -> dict:
    k = len(updated)
    sumsq = sumsq or [float(u) for u in updated]
    two_d = len(shape) == 2
    models = [{"updated": u, "sumsq": s, "in_overlap": 0, "sens_total": None, "sens_overlap": None,
               "energy_inside": (inside[i] if inside else s * 1.5 / math.prod(shape)) if two_d else None}
              for i, (u, s) in enumerate(zip(updated, sumsq, strict=True))]
    pairs = pairs or {}
    return {"name": name, "shape": list(shape), "dtype": "F32", "numel": math.prod(shape),
            "base_sumsq": float(math.prod(shape)),
            "svd": {"method": "exact", "rank": 1, "q": min(shape)} if two_d else None, "models": models,
            "pairs": [{"a": a, "b": b, "intersection": pairs.get((a, b), (0, 0, 0.0))[0],
                       "sign_conflicts": pairs.get((a, b), (0, 0, 0.0))[1], "dot": pairs.get((a, b), (0, 0, 0.0))[2]}
                      for a in range(k) for b in range(a + 1, k)]}


def _report(raws: list[dict], labels: list[str], rank_fraction: float = 0.01) -> dict:
    from sar_dist.analyze.run import DEFINITIONS, aggregate

    agg = aggregate(raws, labels, False)
    return {"inputs": {"base": "base", "models": labels, "labels": labels, "fisher": None},
            "settings": {"tolerance": 0.0, "rank_fraction": rank_fraction, "svd": "auto",
                         "svd_counts": {"exact": sum(r["svd"] is not None for r in raws)}},
            "definitions": DEFINITIONS, "num_tensors": len(raws), "num_parameters": agg["overall"]["numel"], **agg}


def _table(md: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first table under ``heading``, as {column header: cell} (first header of a name wins)."""
    lines = md.split(f"\n{heading}\n", 1)[1].splitlines()
    rows = [ln for ln in lines[:next((i for i, ln in enumerate(lines) if ln.startswith("#")), len(lines))]
            if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    header = split[0]
    return [{h: c for h, c in reversed(list(zip(header, cells, strict=True)))} for cells in split[2:]]


def _reading(md: str) -> list[str]:
    body = md.split("\n## Reading\n\n", 1)[1].split("\n\n", 1)[0]
    return [ln[2:] for ln in body.splitlines()]


_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?[%x]?(?![\w.])")


def _check_reading(md: str, report: dict) -> list[str]:
    """Every number the reading quotes is a cell of a table (or the header line, or a documented threshold),
    and every model's density, pair's overlap vs chance and cosine is quoted as its table cell."""
    from sar_dist.analyze.run import READING_RULES

    reading = _reading(md)
    per_model = _table(md, "## Per model (all tensors)")
    pairs = _table(md, "## Pairs (all tensors)") if report["overall"]["pairs"] else []
    allowed = set()
    for row in per_model + pairs:
        for cell in row.values():
            allowed |= set(_NUMBER.findall(cell))
    allowed |= set(_NUMBER.findall(md.split("\n## Models", 1)[0]))  # the header line (rank fraction)
    allowed |= set(_NUMBER.findall(" ".join(READING_RULES.values())))
    for sentence in reading:
        for number in _NUMBER.findall(sentence):
            assert number in allowed, (number, sentence)
    text = "\n".join(reading)
    for row in per_model:
        assert f"{row['model']} {row['density']} (" in reading[0], (row, reading[0])
        assert f"{row['model']} {row['off-principal share']} outside (chance {row['chance']}), " \
               f"{row['principal energy vs chance']} the chance energy inside" in text
    for row in pairs:
        assert (f"{row['pair']}: {row['overlap vs chance']}" in text) is (row["overlap vs chance"] != "n/a"), row
        assert (f"{row['pair']} {row['cosine']}" in text) is (row["cosine"] != "n/a"), row
    return reading


def _density_word(cell: str) -> str:
    """The documented thresholds, on the value the table prints."""
    d = float(cell.rstrip("%"))
    if d == 0:
        return "unchanged"
    return "very sparse" if d < 1 else "sparse" if d < 10 else "moderately sparse" if d < 50 else "dense"


def _overlap_phrase(cell: str) -> str:
    r = float(cell.rstrip("x"))
    return ("Overlap well below chance" if r < 0.5 else "Overlap well above chance" if r > 2
            else "Overlap within a factor of 2 of chance")


def test_reading_quotes_the_tables_not_other_numbers():
    """The case of issue 11: 25.6% density was called "dense", and the reading quoted the Jaccard ratio
    (6.3x) where the table's "overlap vs chance" column shows |A & B| / (N p q) = 3.76x; an update that puts
    5x the chance energy in the principal block was said to avoid the principal directions."""
    from sar_dist.analyze.run import render_markdown

    # N = 10,000; |A| = 2,560 (25.600%), |B| = 2,474, |A & B| = 2,384: 3.76x chance, Jaccard ratio 6.25
    raw = _raw(Q, (100, 100), [2560, 2474], sumsq=[4.0, 9.0], inside=[4.0 * 5e-4, 9.0 * 5e-4],
               pairs={(0, 1): (2384, 1000, 0.3)})
    rep = _report([raw], ["a", "b"])
    pair = rep["overall"]["pairs"][0]
    assert f"{pair['jaccard_vs_chance']:.1f}" == "6.3" and f"{pair['intersection_vs_chance']:.3g}" == "3.76"
    md = render_markdown(rep)
    reading = _check_reading(md, rep)
    text = "\n".join(reading)
    (row,) = _table(md, "## Pairs (all tensors)")
    assert row["overlap vs chance"] == "3.76x" and "a / b: 3.76x" in text and "6.3" not in text and "6.25" not in text
    assert f"sign conflicts in overlap {row['sign conflicts in overlap'].split()[0]}" in text  # 41.9%
    assert reading[0] == "Update density (column 'density'): a 25.600% (moderately sparse), b 24.740% (moderately sparse)."
    assert "dense" not in reading[0].replace("moderately sparse", "")
    assert any(s.startswith("Overlap well above chance") and "a / b: 3.76x" in s for s in reading)
    assert any(s.startswith("Task vectors nearly orthogonal") and "a / b 0.05" in s for s in reading)
    models = {r["model"]: r for r in _table(md, "## Per model (all tensors)")}
    assert models["a"]["principal energy vs chance"] == "5x" and models["a"]["chance"] == "99.99%"
    assert "concentrate on the base's principal directions" in text and "avoid" not in text
    assert "interfere little" not in text  # not sparse (< 10%), and the pair is above chance
    assert "How the reading is worded" in md and "moderately sparse: 10% to < 50%" in md


@pytest.mark.parametrize("case", ["sparse_orthogonal", "dense_opposed", "separate"])
def test_reading_bands_follow_the_printed_numbers(case):
    from sar_dist.analyze.run import render_markdown

    if case == "sparse_orthogonal":  # 3% and 0.5%: near chance (1.2x), cosine 0.001: the interference sentence
        raw = _raw(Q, (1000, 1000), [30_000, 5_000], sumsq=[1.0, 1.0], pairs={(0, 1): (180, 90, 0.001)})
    elif case == "dense_opposed":  # 60% and 55%: the overlap is at chance (1x), cosine -0.7
        raw = _raw(Q, (1000, 1000), [600_000, 550_000], sumsq=[1.0, 1.0], pairs={(0, 1): (330_000, 1, -0.7)})
    else:  # almost disjoint: 0.1x chance; cosine 0.2
        raw = _raw(Q, (1000, 1000), [200_000, 200_000], sumsq=[1.0, 4.0], pairs={(0, 1): (4_000, 0, 0.4)})
    rep = _report([raw], ["x", "y"])
    md = render_markdown(rep)
    reading = _check_reading(md, rep)
    (row,) = _table(md, "## Pairs (all tensors)")
    assert any(s.startswith(_overlap_phrase(row["overlap vs chance"])) for s in reading), reading
    for m in _table(md, "## Per model (all tensors)"):
        assert f"{m['model']} {m['density']} ({_density_word(m['density'])})" in reading[0]
    cos = float(row["cosine"])
    word = ("nearly orthogonal" if abs(cos) < 0.1 else ("aligned" if cos > 0 else "opposed")
            if abs(cos) >= 0.5 else "partly " + ("aligned" if cos > 0 else "opposed"))
    assert f"Task vectors {word} (column 'cosine'): x / y {row['cosine']}." in reading
    sparse = case == "sparse_orthogonal"
    assert any("interfere little" in s for s in reading) is sparse
    assert {"sparse_orthogonal": "0.5x to 2x", "dense_opposed": "0.5x to 2x", "separate": "< 0.5x"}[case] in \
        next(s for s in reading if s.startswith("Overlap"))


def test_density_words_use_the_thresholds_on_the_printed_value():
    """At each boundary the word follows the number printed: 0.9999% prints 1.000% and reads "sparse"."""
    from sar_dist.analyze.run import render_markdown

    updated = [0, 99, 9_999, 10_000, 99_999, 100_000, 256_000, 499_994, 499_996, 1_000_000]
    expected = ["unchanged", "very sparse", "sparse", "sparse", "moderately sparse", "moderately sparse",
                "moderately sparse", "moderately sparse", "dense", "dense"]
    labels = [f"m{i}" for i in range(len(updated))]
    rep = _report([_raw("model.layers.0.mlp.up_proj.weight", (1000, 1000), updated, sumsq=[1.0] * len(updated))],
                  labels)
    md = render_markdown(rep)
    rows = {r["model"]: r for r in _table(md, "## Per model (all tensors)")}
    reading = _check_reading(md, rep)
    for label, word in zip(labels, expected, strict=True):
        cell = rows[label]["density"]
        assert _density_word(cell) == word, (label, cell)
        assert f"{label} {cell} ({word})" in reading[0]
    assert rows["m2"]["density"] == "1.000%" and rows["m8"]["density"] == "50.000%"


def test_module_groups_in_the_report():
    """embed_tokens, lm_head, attention, mlp, norm, the MoE router and the experts are separate groups."""
    from sar_dist.analyze.run import render_markdown

    names = {"model.embed_tokens.weight": ((40, 10), [0, 0]), "lm_head.weight": ((40, 10), [200, 8]),
             Q: ((10, 10), [1, 2]), "model.layers.0.mlp.down_proj.weight": ((10, 10), [3, 4]),
             "model.layers.1.mlp.gate.weight": ((4, 10), [5, 6]),
             "model.layers.1.mlp.experts.0.up_proj.weight": ((10, 10), [7, 8]),
             "model.layers.1.mlp.experts.gate_up_proj": ((4, 10, 10), [9, 10]),
             "model.layers.0.input_layernorm.weight": ((10,), [1, 0]), "model.norm.weight": ((10,), [0, 1])}
    raws = [_raw(name, shape, upd) for name, (shape, upd) in names.items()]
    rep = _report(raws, ["a", "b"])
    assert list(rep["per_module"]) == ["embed_tokens", "lm_head", "attention", "mlp", "router", "experts", "norm"]
    assert [m["density"] for m in rep["per_module"]["embed_tokens"]["models"]] == [0.0, 0.0]
    assert [m["density"] for m in rep["per_module"]["lm_head"]["models"]] == [0.5, 0.02]
    assert rep["per_module"]["experts"]["numel"] == 500 and rep["per_module"]["router"]["numel"] == 40
    assert {t["kind"] for t in rep["per_tensor"] if t["module"] == "experts"} == {"experts.up_proj",
                                                                                 "experts.gate_up_proj"}
    md = render_markdown(rep)
    rows = _table(md, "## Per module")
    assert [(r["module"], r["model"], r["density"]) for r in rows[:4]] == [
        ("embed_tokens", "a", "0.000%"), ("embed_tokens", "b", "0.000%"),
        ("lm_head", "a", "50.000%"), ("lm_head", "b", "2.000%")]
    assert "embedding" not in md.split("## Definitions")[0]
    _check_reading(md, rep)
