"""Every example in configs/ runs (on the tiny models; the S3 one on loopback S3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sar_dist.cli import main as cli_main
from sar_dist.storage import Storage
from sar_dist.synthetic import make_fisher
from tests.conftest import REPO, upload_tree

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_runs(path: Path, tmp_path, tiny_models, request):
    text = path.read_text()
    names = {"base": "base", "rl-math": "ft1", "rl-code": "ft2"}
    if "s3://" in text:
        s3_options = request.getfixturevalue("s3_options")
        storage = Storage(s3_options)
        fs = storage._remote("s3://x")[0]
        bucket = f"cfg-{tmp_path.name}".lower().replace("_", "-")[:60]
        fs.mkdir(bucket)
        for demo, fixture in names.items():
            upload_tree(storage, tiny_models[fixture], f"s3://{bucket}/{demo}")
            if f"s3://models/fisher/{demo}" in text:
                stats = str(tmp_path / "fisher" / demo)
                make_fisher(Storage(), tiny_models[fixture], stats, seed=len(demo))
                upload_tree(storage, stats, f"s3://{bucket}/fisher/{demo}")
        config = yaml.safe_load(text.replace("s3://models/", f"s3://{bucket}/"))
        config["storage_options"] = s3_options
    else:
        for demo, fixture in names.items():
            if f"demo-out/fisher/{demo}" in text:  # statistics in the Fisher stage's format
                stats = str(tmp_path / "fisher" / demo)
                make_fisher(Storage(), tiny_models[fixture], stats, seed=len(demo))
                text = text.replace(f"demo-out/fisher/{demo}", stats)
            text = text.replace(f"demo-out/models/{demo}", tiny_models[fixture])
        config = yaml.safe_load(text)
        config["output"] = str(tmp_path / "out")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config))
    assert cli_main(["merge", str(cfg), "--dry-run"]) == 0
    assert cli_main(["merge", str(cfg), "--executor", "local"]) == 0
    assert cli_main(["verify", config["output"], "--storage-options",
                     __import__("json").dumps(config.get("storage_options", {}))]) == 0
