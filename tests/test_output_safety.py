"""What a run may do to its output, done for real (issue 11): it never writes where it reads,
never overwrites or deletes what it did not write, keeps secrets out of what it shows and
records, never creates a bucket, and holds a lease so that two runs cannot share an output.

Every refusal checks the exit code, that the message is one line, that no input byte
changed (sha256 of every input file) and that nothing at the output looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sar_dist.cli import main as cli_main
from sar_dist.output import LEASE_TTL_S, Lease, LeaseHeld
from sar_dist.storage import Storage, relation
from tests.conftest import REPO, copytree, upload_tree, write_config
from tests.test_cli import _ta_config as ta_config  # task_arithmetic over base, ft1 and ft2


def digest(*roots: str | Path) -> dict[str, str]:
    """sha256 of every file under the roots (hidden files included)."""
    out = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(capsys, *argv: str) -> str:
    """Run the CLI in-process; it must exit 2 with one line on stderr, which is returned."""
    code = cli_main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("sar-dist: error: "), err
    return err


def nothing_complete(out: Path) -> bool:
    return not any((out / n).exists() for n in ("sar_merge.json", "fisher.json", "report.json"))


@pytest.fixture()
def models(tmp_path, tiny_models) -> dict[str, str]:
    """Private copies: a test may point its output into them."""
    return {k: copytree(v, str(tmp_path / k)) for k, v in tiny_models.items()}


# --- 1. never write where it reads ----------------------------------------------------
@pytest.mark.parametrize("where", ["base", "inside_model", "parent", "symlink_to_base"])
def test_merge_output_overlapping_an_input_is_refused(tmp_path, models, capsys, where):
    out = {"base": models["base"], "inside_model": f"{models['ft1']}/merged", "parent": str(tmp_path),
           "symlink_to_base": str(tmp_path / "link")}[where]
    if where == "symlink_to_base":
        os.symlink(models["base"], out)
    cfg = ta_config(tmp_path, models, out)
    before = digest(*models.values())
    err = refused(capsys, "merge", cfg, "--executor", "local")
    assert "a run never writes where it reads" in err
    assert {"base": " is base_model ", "inside_model": " lies inside models[0] ", "parent": " contains ",
            "symlink_to_base": " is base_model "}[where] in err, err
    assert digest(*models.values()) == before


def test_output_holding_a_symlinked_input_shard_is_refused(tmp_path, models, capsys):
    """A model whose shard is a symlink into the output reads from the output: refused."""
    out = tmp_path / "out"
    out.mkdir()
    shard = next(Path(models["ft2"]).glob("*.safetensors"))
    os.replace(shard, out / "stash.safetensors")
    os.symlink(out / "stash.safetensors", shard)
    before = digest(*models.values(), out)
    err = refused(capsys, "merge", ta_config(tmp_path, models, str(out)), "--executor", "local")
    assert "contains input file" in err and f"a link to {out}/stash.safetensors" in err
    assert digest(*models.values(), out) == before


def test_tokenizer_source_and_fisher_dirs_count_as_inputs(tmp_path, models, capsys):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    cfg = Path(ta_config(tmp_path, models, str(tok)))
    cfg.write_text(cfg.read_text().replace("tokenizer_source: base", f"tokenizer_source: {tok}"))
    err = refused(capsys, "merge", str(cfg), "--executor", "local")
    assert " is tokenizer_source " in err
    assert (tok / "tokenizer.json").read_text() == "{}"
    # a Fisher statistics directory of a model is an input too
    from sar_dist.synthetic import make_fisher

    make_fisher(Storage(), models["ft1"], str(tmp_path / "fi1"), seed=1)
    make_fisher(Storage(), models["ft2"], str(tmp_path / "fi2"), seed=2)
    sar = write_config(tmp_path / "sar.yaml", f"merge_method: sar\nbase_model: {models['base']}\nmodels:\n"
                       f"  - {{model: {models['ft1']}, fisher: {tmp_path}/fi1}}\n"
                       f"  - {{model: {models['ft2']}, fisher: {tmp_path}/fi2}}\noutput: {tmp_path}/fi2/merged\n")
    before = digest(tmp_path / "fi2")
    assert " lies inside models[1].fisher " in refused(capsys, "merge", sar, "--executor", "local")
    assert digest(tmp_path / "fi2") == before


def test_relation_of_object_store_urls():
    assert relation("s3://b/base", "s3://b/base") == "is"
    assert relation("s3://b/base/", "s3a://b/base") == "is"
    assert relation("s3://b", "s3://b/base") == "contains"
    assert relation("s3://b/base/merged", "s3://b/base") == "lies inside"
    assert relation("s3://b/base-merged", "s3://b/base") is None  # a key prefix, not a folder
    assert relation("s3://other/base", "s3://b/base") is None
    assert relation("/b/base", "s3://b/base") is None


def test_merge_into_an_s3_input_prefix_is_refused(tmp_path, tiny_models, s3_options, capsys):
    storage = Storage(s3_options)
    storage._remote("s3://x")[0].mkdir("safety-in")
    for k in ("base", "ft1", "ft2"):
        upload_tree(storage, tiny_models[k], f"s3://safety-in/{k}")
    remote = {k: f"s3://safety-in/{k}" for k in ("base", "ft1", "ft2")}
    opts = json.dumps(s3_options)
    before = {u: storage.read_bytes(f"{u}/model.safetensors.index.json") for u in remote.values()
              if storage.exists(f"{u}/model.safetensors.index.json")}
    cfg = ta_config(tmp_path, remote, "s3://safety-in/base/merged", extra=f"storage_options: {opts}\n")
    err = refused(capsys, "merge", cfg, "--executor", "local")
    assert "lies inside base_model s3://safety-in/base" in err
    assert not storage.exists("s3://safety-in/base/merged/sar_merge.json")
    assert {u: storage.read_bytes(f"{u}/model.safetensors.index.json") for u in before} == before


def test_fisher_output_overlapping_model_or_data_is_refused(tmp_path, models, capsys):
    data = Path(models["ft1"]) / "calib.jsonl"
    data.write_text('{"input_ids": [1, 2, 3, 4]}\n' * 2)
    before = digest(models["ft1"])
    err = refused(capsys, "fisher", "--model", models["ft1"], "--data", str(data), "--output", models["ft1"])
    assert "is the model" in err
    err = refused(capsys, "fisher", "--model", models["base"], "--data", str(data), "--output", models["ft1"])
    assert "contains the data" in err
    assert digest(models["ft1"]) == before


def test_analyze_output_overlapping_an_input_is_refused(tmp_path, models, capsys):
    before = digest(*models.values())
    err = refused(capsys, "analyze", "--base", models["base"], "--model", models["ft1"], "--output",
                  f"{models['ft1']}/report", "--executor", "local")
    assert "lies inside model 1" in err
    assert digest(*models.values()) == before


# --- 2. never touch what it did not write ---------------------------------------------
def foreign_dir(path: Path) -> Path:
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"precious weights")
    (path / "config.json").write_text('{"mine": true}')
    (path / ".sar_dist").mkdir()
    (path / ".sar_dist" / "notes").write_text("not sar-dist's")
    return path


def test_foreign_directory_is_refused_and_never_overwritten(tmp_path, models, capsys):
    out = foreign_dir(tmp_path / "out")
    before = digest(out, *models.values())
    cfg = ta_config(tmp_path, models, str(out))
    err = refused(capsys, "merge", cfg, "--executor", "local")
    assert "not empty and not written by sar-dist" in err and "--force" in err
    # --force writes beside foreign files, never over them: config.json is a name the merge writes
    err = refused(capsys, "merge", cfg, "--executor", "local", "--force")
    assert "'config.json' is there and was not written by sar-dist" in err
    assert digest(out, *models.values()) == before and nothing_complete(out)


def test_force_writes_beside_foreign_files_and_removes_only_its_own(tmp_path, models, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.txt").write_text("keep me")
    (out / ".sar_dist").mkdir()
    (out / ".sar_dist" / "notes").write_text("not sar-dist's")
    cfg = ta_config(tmp_path, models, str(out), extra="out_shard_size: 20000\n")
    assert cli_main(["merge", cfg, "--executor", "local", "--force"]) == 0
    first = json.loads((out / "sar_merge.json").read_text())
    assert set(first["files"]) <= {p.name for p in out.iterdir()} and "README.txt" not in first["files"]
    # a different merge over it (--force) removes the old merge's shards it no longer writes, nothing else
    (out / "model-99999-of-99999.safetensors").write_bytes(b"someone else's")
    cfg2 = ta_config(tmp_path, models, str(out), extra="out_shard_size: 200000\n", name="c2.yaml")
    refused(capsys, "merge", cfg2, "--executor", "local")  # a different complete merge needs --force
    assert cli_main(["merge", cfg2, "--executor", "local", "--force"]) == 0
    second = json.loads((out / "sar_merge.json").read_text())
    names = {p.name for p in out.iterdir()}
    assert names == set(second["files"]) | {"README.txt", ".sar_dist", "model-99999-of-99999.safetensors"}
    assert (out / "README.txt").read_text() == "keep me"
    assert (out / ".sar_dist" / "notes").read_text() == "not sar-dist's"
    assert os.listdir(out / ".sar_dist") == ["notes"]  # its own state files went, by name


def test_analyze_and_fisher_refuse_a_foreign_directory(tmp_path, models, capsys):
    out = foreign_dir(tmp_path / "out")
    before = digest(out)
    err = refused(capsys, "analyze", "--base", models["base"], "--model", models["ft1"], "--output", str(out),
                  "--executor", "local")
    assert "not written by sar-dist" in err
    data = tmp_path / "d.jsonl"
    data.write_text('{"input_ids": [1, 2, 3]}\n')
    err = refused(capsys, "fisher", "--model", models["base"], "--data", str(data), "--output", str(out))
    assert "not written by sar-dist" in err
    assert digest(out) == before


# --- 3. secrets ---------------------------------------------------------------------
@pytest.mark.parametrize("where", ["endpoint", "model_url", "output_url"])
def test_credentials_in_urls_are_refused_and_never_shown(tmp_path, models, capsys, where):
    out = str(tmp_path / "out")
    extra = ""
    m = dict(models)
    if where == "endpoint":
        extra = 'storage_options: {client_kwargs: {endpoint_url: "http://AKIAXX:s3cr3tv4lue@127.0.0.1:9"}}\n'
    elif where == "model_url":
        m["ft1"] = "s3://AKIAXX:s3cr3tv4lue@bucket/ft1"
    else:
        out = "s3://AKIAXX:s3cr3tv4lue@bucket/out"
    err = refused(capsys, "merge", ta_config(tmp_path, m, out, extra=extra), "--executor", "local", "--json")
    assert "carries credentials" in err
    assert "s3cr3tv4lue" not in err and "AKIAXX" not in err
    assert not Path(tmp_path / "out").exists()


def test_redact_removes_userinfo_everywhere():
    from sar_dist.storage import redact, redact_obj

    assert redact("failed on s3://K:S@b/x and http://u:p@h:9/y") == "failed on s3://b/x and http://h:9/y"
    assert redact_obj({"a": ["s3://K:S@b/x"], "n": 1}) == {"a": ["s3://b/x"], "n": 1}


# --- 6. duplicate keys --------------------------------------------------------------
@pytest.mark.parametrize("text, key, line", [
    ("merge_method: linear\nmerge_method: ties\n", "merge_method", 2),
    ("merge_method: ties\nparameters:\n  density: 0.5\n  density: 0.7\n", "density", 4),
])
def test_duplicate_yaml_keys_are_refused(tmp_path, capsys, text, key, line):
    cfg = write_config(tmp_path / "dup.yaml", text + f"models: [{{model: {tmp_path}/m}}]\noutput: {tmp_path}/o\n")
    err = refused(capsys, "merge", cfg)
    assert f"duplicate key '{key}' (line {line}" in err
    assert not (tmp_path / "o").exists()


def test_duplicate_keys_in_a_fisher_config_are_refused(tmp_path, capsys):
    cfg = write_config(tmp_path / "f.yaml", f"model: {tmp_path}/m\ndata: {tmp_path}/d\noutput: {tmp_path}/o\n"
                                            f"max_length: 8\nmax_length: 16\n")
    assert "duplicate key 'max_length' (line 5" in refused(capsys, "fisher", cfg)


# --- 7. buckets ---------------------------------------------------------------------
def test_missing_bucket_is_refused_and_not_created(tmp_path, models, s3_options, capsys):
    storage = Storage(s3_options)
    fs = storage._remote("s3://x")[0]
    cfg = ta_config(tmp_path, models, "s3://nosuchbucket-merge/merged",
                    extra=f"storage_options: {json.dumps(s3_options)}\n")
    err = refused(capsys, "merge", cfg, "--executor", "local")
    assert "bucket 'nosuchbucket-merge' does not exist" in err
    data = tmp_path / "d.jsonl"
    data.write_text('{"input_ids": [1, 2, 3]}\n')
    err = refused(capsys, "fisher", "--model", models["base"], "--data", str(data), "--output",
                  "s3://nosuchbucket-fisher/stats", "--storage-options", json.dumps(s3_options))
    assert "bucket 'nosuchbucket-fisher' does not exist" in err
    fs.invalidate_cache()
    assert not fs.exists("nosuchbucket-merge") and not fs.exists("nosuchbucket-fisher")


def test_invalid_bucket_name_gives_the_reason(tmp_path, models, s3_options, capsys):
    m = {**models, "ft1": "s3://Bad_Bucket!/ft1"}
    cfg = ta_config(tmp_path, m, str(tmp_path / "out"), extra=f"storage_options: {json.dumps(s3_options)}\n")
    err = refused(capsys, "merge", cfg, "--executor", "local")
    assert 'Invalid bucket name "Bad_Bucket!"' in err and not (tmp_path / "out").exists()


# --- 9. one run at a time -----------------------------------------------------------
HOLDER = """
import sys, time
from sar_dist.output import Lease
from sar_dist.storage import Storage
Lease(Storage(), sys.argv[1], "merge").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_held_lease_refuses_a_second_run_and_a_killed_holder_does_not(tmp_path, models, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = ta_config(tmp_path, models, str(out))
        err = refused(capsys, "merge", cfg, "--executor", "local")
        assert f"in use by a merge by pid {holder.pid} on " in err
        assert nothing_complete(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert cli_main(["merge", cfg, "--executor", "local"]) == 0  # a killed run's lease is stale at once here
    assert (out / "sar_merge.json").exists() and not (out / ".sar_dist").exists()


def test_two_concurrent_merges_one_wins_the_other_is_refused(tmp_path, models):
    out = tmp_path / "out"
    cfg = ta_config(tmp_path, models, str(out), extra="out_shard_size: 20000\n")
    cmd = [sys.executable, "-m", "sar_dist.cli", "merge", cfg, "--executor", "local"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    errors = " ".join(e for _, e in results)
    assert "Traceback" not in errors and "FileNotFoundError" not in errors, errors
    # one wins; the other was refused by the lease, or (if it came late) found the merge complete
    assert codes in ([0, 2], [0, 0]), errors
    if codes == [0, 2]:
        assert "in use by a merge by pid" in errors
    assert cli_main(["verify", str(out)]) == 0


def test_lease_on_object_storage(tmp_path, s3_options):
    storage = Storage(s3_options)
    storage._remote("s3://x")[0].mkdir("lease-bucket")
    out = "s3://lease-bucket/out"
    first = Lease(storage, out, "merge")
    first.acquire()
    try:
        with pytest.raises(LeaseHeld, match=f"in use by a merge by pid {os.getpid()}"):
            Lease(storage, out, "merge").acquire()
    finally:
        first.release()
    # another host's lease: live while its heartbeat is fresh, stale after the TTL
    other = {"what": "merge", "host": "elsewhere", "boot_id": "x", "pid": 1, "started": time.time()}
    storage.write_bytes(f"{out}/.sar_dist/lease-000007.json", json.dumps({**other, "heartbeat": time.time()}).encode())
    with pytest.raises(LeaseHeld, match="on elsewhere"):
        Lease(storage, out, "merge").acquire()
    storage.write_bytes(f"{out}/.sar_dist/lease-000007.json",
                        json.dumps({**other, "heartbeat": time.time() - LEASE_TTL_S - 5}).encode())
    taker = Lease(storage, out, "merge")
    taker.acquire()
    assert taker.url.endswith("lease-000008.json") and not storage.exists(f"{out}/.sar_dist/lease-000007.json")
    # the taken-over run finds out before it commits
    storage.write_bytes(f"{out}/.sar_dist/lease-000009.json", json.dumps({**other, "heartbeat": time.time()}).encode())
    with pytest.raises(LeaseHeld, match="lease expired and was taken by"):
        taker.check()
    taker.release()


# --- 10. one line, with the reason ----------------------------------------------------
def test_a_newline_in_a_tensor_name_stays_on_one_line(tmp_path, models, capsys):
    from safetensors.torch import load_file, save_file

    # the base gains a tensor the fine-tunes lack, named with a newline
    shard = sorted(Path(models["base"]).glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    tensors["extra\nINJECTED"] = next(iter(tensors.values())).clone()
    save_file(tensors, str(shard))
    index = Path(models["base"]) / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    idx["weight_map"]["extra\nINJECTED"] = shard.name
    index.write_text(json.dumps(idx))
    err = refused(capsys, "merge", ta_config(tmp_path, models, str(tmp_path / "out")), "--executor", "local")
    assert "missing tensor 'extra\\nINJECTED'" in err


# --- 11. a base the method does not merge ----------------------------------------------
def test_fisher_method_accepts_a_base_it_does_not_merge(tmp_path, models):
    from sar_dist.synthetic import make_fisher
    from tests.conftest import load_safetensors_dir

    storage = Storage()
    for k in ("ft1", "ft2"):
        make_fisher(storage, models[k], str(tmp_path / f"fi-{k}"), seed=1)
    body = (f"merge_method: fisher\nbase_model: {models['base']}\ntokenizer_source: base\nmodels:\n"
            f"  - {{model: {models['ft1']}, fisher: {tmp_path}/fi-ft1}}\n"
            f"  - {{model: {models['ft2']}, fisher: {tmp_path}/fi-ft2}}\n")
    with_base = write_config(tmp_path / "b.yaml", body + f"output: {tmp_path}/with-base\n")
    without = write_config(tmp_path / "n.yaml", body.replace(f"base_model: {models['base']}\n", "")
                           .replace("tokenizer_source: base\n", "") + f"output: {tmp_path}/without\n")
    assert cli_main(["merge", with_base, "--executor", "local"]) == 0
    assert cli_main(["merge", without, "--executor", "local"]) == 0
    a, b = load_safetensors_dir(tmp_path / "with-base"), load_safetensors_dir(tmp_path / "without")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # the base is not an input
    assert (tmp_path / "with-base" / "tokenizer.json").exists()
