"""`sar-dist merge / inspect / verify` end to end, as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from sar_dist.cli import main as cli_main
from sar_dist.storage import Storage
from tests.conftest import load_safetensors_dir, run_cli, tree_bytes, write_config


def _ta_config(tmp_path: Path, models: dict[str, str], out: str, extra: str = "", name: str = "c.yaml") -> str:
    return write_config(
        tmp_path / name,
        f"merge_method: task_arithmetic\nbase_model: {models['base']}\n"
        f"models:\n  - model: {models['ft1']}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {models['ft2']}\n    parameters: {{weight: 1.0}}\n"
        f"parameters: {{lambda: 1.0}}\ntokenizer_source: base\noutput: {out}\n{extra}",
    )


def test_merge_local_matches_reference_and_is_complete(tmp_path, tiny_models):
    out = tmp_path / "out"
    cfg = _ta_config(tmp_path, tiny_models, str(out), extra="out_shard_size: 50000\n")
    r = run_cli("merge", cfg, "--executor", "local")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "sar_merge.json" in names and "model.safetensors.index.json" in names
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    assert ".sar_dist" not in names  # receipts are folded into the manifest
    manifest = json.loads((out / "sar_merge.json").read_text())
    assert len(manifest["shards"]) > 1 and manifest["config"]["merge_method"] == "task_arithmetic"
    assert "torch" in manifest["versions"] and manifest["inputs"]

    base, ft1, ft2 = (load_safetensors_dir(tiny_models[k]) for k in ("base", "ft1", "ft2"))
    merged = load_safetensors_dir(out)
    assert merged.keys() == base.keys()
    for name, b in base.items():
        expected = (b.float() + 0.7 * (ft1[name].float() - b.float()) + (ft2[name].float() - b.float())).bfloat16()
        assert merged[name].dtype == torch.bfloat16
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=0)

    # a rerun finds the merge complete and changes nothing
    before = tree_bytes(out)
    r2 = run_cli("merge", cfg, "--executor", "local")
    assert r2.returncode == 0 and "already holds this merge" in r2.stderr
    assert tree_bytes(out) == before

    # verify: ok, then a flipped byte is caught
    assert run_cli("verify", str(out)).returncode == 0
    shard = out / manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    r3 = run_cli("verify", str(out))
    assert r3.returncode == 1 and "MISMATCH" in r3.stdout


def test_inspect_and_dry_run(tmp_path, tiny_models):
    r = run_cli("inspect", tiny_models["base"], "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["num_tensors"] == 21 and info["tensors"][0]["dtype"] == "BF16"
    r = run_cli("inspect", tiny_models["base"])
    assert "model.embed_tokens.weight" in r.stdout and "21 tensors" in r.stdout

    out = tmp_path / "dry"
    cfg = _ta_config(tmp_path, tiny_models, str(out))
    r = run_cli("merge", cfg, "--dry-run", "--memory-budget", "20KB")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["num_tensors"] == 21 and plan["read_bytes"] > 0 and plan["write_bytes"] > 0
    assert sum(s["chunked_tensors"] for s in plan["shards"]) > 0  # 20 KB forces row chunks
    assert not out.exists()  # a dry run writes nothing

    r = run_cli("merge", cfg, "--executor", "local", "--read-concurrency", "0")
    assert r.returncode == 2 and "read concurrency must be >= 1" in r.stderr and not out.exists(), r.stderr


def _break(kind: str, tmp_path: Path, models: dict[str, str]) -> tuple[str, str]:
    """Build one kind of bad input; returns (config path, expected message fragment)."""
    out = str(tmp_path / "out")
    if kind == "unknown_method":
        return write_config(tmp_path / "c.yaml", f"merge_method: nope\nbase_model: {models['base']}\nmodels: [{{model: {models['ft1']}}}]\noutput: {out}\n"), "unknown merge_method 'nope'"
    if kind == "bad_yaml":
        return write_config(tmp_path / "c.yaml", "merge_method: [\n"), "invalid YAML"
    if kind == "missing_model":
        return write_config(tmp_path / "c.yaml", f"merge_method: task_arithmetic\nbase_model: {models['base']}\nmodels: [{{model: {tmp_path / 'nope'}}}]\nparameters: {{weight: 1.0}}\noutput: {out}\n"), "nope: no such directory"
    if kind == "secret":
        return _ta_config(tmp_path, models, out, extra="storage_options: {secret: abc}\n"), "looks like a credential"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["unknown_method", "bad_yaml", "missing_model", "secret"])
def test_bad_config_exits_2_and_writes_nothing(tmp_path, tiny_models, kind):
    cfg, fragment = _break(kind, tmp_path, tiny_models)
    r = run_cli("merge", cfg)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("sar-dist: error:") and fragment in lines[-1] and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_parameter_names_the_key(tmp_path, tiny_models):
    cfg = _ta_config(tmp_path, tiny_models, str(tmp_path / "out"))
    Path(cfg).write_text(Path(cfg).read_text().replace("lambda: 1.0", "lambdaa: 1.0"))
    r = run_cli("merge", cfg)
    assert r.returncode == 2 and "unknown parameter 'lambdaa'" in r.stderr and cfg in r.stderr


def _corrupt_copy(src: str, dst: Path, how: str) -> str:
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    if how == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif how == "header":
        shard.write_bytes(data[:8] + b"[" + data[9:])
    elif how == "shape":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(shard))
        name = sorted(tensors)[0]
        tensors[name] = torch.zeros(3, 5, dtype=torch.bfloat16)
        save_file(tensors, str(shard), metadata={"format": "pt"})
        idx = json.loads((dst / "model.safetensors.index.json").read_text())
        assert idx["weight_map"][name] == shard.name
    elif how == "pickle":
        for p in dst.glob("model*"):
            p.unlink()
        (dst / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    return str(dst)


@pytest.mark.parametrize("how, fragment", [
    ("truncate", "truncated"),
    ("header", "corrupt safetensors header"),
    ("shape", "has shape [3, 5]"),
    ("pickle", "pickled weights"),
])
def test_bad_checkpoint_exits_2_naming_file(tmp_path, tiny_models, how, fragment):
    bad = _corrupt_copy(tiny_models["ft2"], tmp_path / "bad", how)
    out = tmp_path / "out"
    cfg = _ta_config(tmp_path, {**tiny_models, "ft2": bad}, str(out))
    r = run_cli("merge", cfg, "--executor", "local")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert fragment in line and str(tmp_path / "bad") in line
    assert not out.exists()


def test_different_complete_merge_needs_force(tmp_path, tiny_models):
    out = tmp_path / "out"
    cfg = _ta_config(tmp_path, tiny_models, str(out))
    assert run_cli("merge", cfg, "--executor", "local").returncode == 0
    before = tree_bytes(out)
    cfg2 = _ta_config(tmp_path, tiny_models, str(out), name="c2.yaml")
    Path(cfg2).write_text(Path(cfg2).read_text().replace("weight: 0.7", "weight: 0.5"))
    r = run_cli("merge", cfg2, "--executor", "local")
    assert r.returncode == 2 and "already holds a different complete merge" in r.stderr
    assert tree_bytes(out) == before
    r = run_cli("merge", cfg2, "--executor", "local", "--force")
    assert r.returncode == 0, r.stderr
    assert tree_bytes(out) != before
    assert run_cli("verify", str(out)).returncode == 0


class FlakyMemoryFS(MemoryFileSystem):
    """memory:// that fails the first write of a chosen shard (a crash mid-run)."""

    protocol = "flaky"
    store: dict = {}
    pseudo_dirs = [""]
    fail_once: set[str] = set()

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            for marker in list(self.fail_once):
                if marker in path:
                    self.fail_once.discard(marker)
                    raise ConnectionResetError(f"injected failure writing {path}")
        return super()._open(path, mode, **kwargs)


def test_resume_after_failure_is_bit_identical(tmp_path, tiny_models):
    fsspec.register_implementation("flaky", FlakyMemoryFS, clobber=True)
    ref_out = f"memory://ref-{tmp_path.name}/out"
    cfg = _ta_config(tmp_path, tiny_models, ref_out, extra="out_shard_size: 15000\n")
    assert cli_main(["merge", cfg, "--executor", "local"]) == 0

    out = f"flaky://{tmp_path.name}/out"
    cfg2 = _ta_config(tmp_path, tiny_models, out, extra="out_shard_size: 15000\n", name="c2.yaml")
    FlakyMemoryFS.fail_once = {"-00003-of-"}
    assert cli_main(["merge", cfg2, "--executor", "local"]) == 1
    storage = Storage()
    listed = storage.listdir(out)
    assert "sar_merge.json" not in listed  # never looks complete
    assert sorted(n for n in listed if n.endswith(".safetensors")) == [
        "model-00001-of-00005.safetensors", "model-00002-of-00005.safetensors"]  # finished before the failure

    assert cli_main(["merge", cfg2, "--executor", "local"]) == 0  # resumes
    ref_manifest = json.loads(storage.read_bytes(f"{ref_out}/sar_merge.json"))
    manifest = json.loads(storage.read_bytes(f"{out}/sar_merge.json"))
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in ref_manifest["shards"]]
    for s in manifest["shards"]:
        assert storage.read_bytes(f"{out}/{s['file']}") == storage.read_bytes(f"{ref_out}/{s['file']}")


def test_unreachable_storage_exits_2(tmp_path):
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml",
        "merge_method: task_arithmetic\nbase_model: s3://nobucket/base\nmodels: [{model: s3://nobucket/ft}]\n"
        f"parameters: {{weight: 1.0}}\noutput: {out}\n"
        "storage_options: {client_kwargs: {endpoint_url: 'http://127.0.0.1:9'}, "
        "config_kwargs: {retries: {max_attempts: 1}, connect_timeout: 2}}\n",
    )
    r = run_cli("merge", cfg, env={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    assert r.returncode == 2, r.stderr
    assert "base model s3://nobucket/base: cannot reach it" in r.stderr.strip().splitlines()[-1]
    assert not out.exists()


def test_json_events_for_orchestrators(tmp_path, tiny_models):
    cfg = _ta_config(tmp_path, tiny_models, str(tmp_path / "out"), extra="out_shard_size: 15000\n")
    r = run_cli("merge", cfg, "--executor", "local", "--json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "committed"
    assert kinds.count("shard_done") == 5 and kinds.count("tensor_done") == 21
    last_shard = [e for e in events if e["event"] == "shard_done"][-1]
    assert last_shard["shards_done"] == 5 and last_shard["tensors_done"] == 21
    assert last_shard["bytes_done"] == last_shard["bytes_total"] and last_shard["eta_s"] == 0
