"""The same YAML through mergekit 0.1.5 (`mergekit-yaml`) and sar-dist gives the same tensors.

Deterministic methods only (random ones share mergekit's distribution, not its global RNG
stream; see test_methods.py). The models are float32 RLVR-like fine-tunes so magnitudes
almost never tie at a TIES threshold, where mergekit's unstable argsort and our positional
tie-break may legitimately differ.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sar_dist.cli import main as cli_main
from sar_dist.storage import Storage
from sar_dist.synthetic import LlamaShape, make_base, make_finetune
from tests.conftest import load_safetensors_dir

MERGEKIT_YAML = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
SHAPE = LlamaShape(hidden=32, layers=3, heads=4, kv_heads=2, intermediate=48, vocab=64)

# case -> (method, top-level parameters, per-model parameters)
CASES: dict[str, tuple[str, dict, list[dict]]] = {
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.9}, [{"weight": 0.7}, {"weight": [0.2, 1.0]}, {"weight": 0.5}]),
    "ties": ("ties", {"density": 0.02}, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.8}]),
    "ties_unnormalized_rescaled": (
        "ties",
        {"density": [{"filter": "mlp", "value": 0.015}, {"value": 0.5}], "normalize": False, "rescale": True},
        [{"weight": 1.0}, {"weight": 1.0}, {"weight": 1.0}],
    ),
    "breadcrumbs": ("breadcrumbs", {"density": 0.9, "gamma": 0.01}, [{"weight": 1.0}, {"weight": 0.6}, {"weight": 1.0}]),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.95, "gamma": 0.02},
                         [{"weight": 1.0}, {"weight": 1.0}, {"weight": 0.3}]),
    # mergekit's linear takes a listed base_model as one more input, weighted by the top level
    "linear": ("linear", {"weight": 0.5}, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}]),
    "slerp": ("slerp", {"t": [0.0, 0.3, 0.9]}, []),
    "ram": ("ram", {}, [{}, {}, {}]),
    "ramplus_tl": ("ramplus_tl", {"r": 0.2, "alpha": 0.3}, [{}, {}, {}]),
    "dare_linear_density_1": ("dare_linear", {"density": 1.0}, [{"weight": 0.5}, {"weight": 1.0}, {"weight": 0.7}]),
}


@pytest.fixture(scope="module")
def fp32_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fp32")
    storage = Storage()
    paths = {"base": str(root / "base")}
    make_base(storage, paths["base"], SHAPE, seed=3, dtype=torch.float32)
    for i, region in enumerate([(0.0, 0.7), (0.3, 1.0), (0.0, 1.0)]):
        paths[f"ft{i}"] = str(root / f"ft{i}")
        make_finetune(storage, paths["base"], paths[f"ft{i}"], seed=10 + i, density=0.04, region=region)
    return paths


def _yaml(case: str, models: dict[str, str]) -> str:
    method, top, per_model = CASES[case]
    if method == "slerp":  # mergekit style: the base is listed among the models
        entries = [{"model": models["base"]}, {"model": models["ft0"]}]
    else:
        entries = [{"model": models[f"ft{i}"], **({"parameters": p} if p else {})} for i, p in enumerate(per_model)]
    config = {"merge_method": method, "base_model": models["base"], "models": entries, "dtype": "float32"}
    if top:
        config["parameters"] = top
    return yaml.safe_dump(config, sort_keys=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tensors_as_mergekit(case, tmp_path, fp32_models):
    text = _yaml(case, fp32_models)
    mk_cfg = tmp_path / "mk.yaml"
    mk_cfg.write_text(text)
    mk_out = tmp_path / "mergekit"
    r = subprocess.run([MERGEKIT_YAML, str(mk_cfg), str(mk_out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    ours_cfg = tmp_path / "ours.yaml"
    ours_cfg.write_text(text + f"output: {tmp_path / 'ours'}\n")
    assert cli_main(["merge", str(ours_cfg), "--executor", "local"]) == 0
    theirs, ours = load_safetensors_dir(mk_out), load_safetensors_dir(tmp_path / "ours")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype == torch.float32, name
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{case} {name}: {m}")
