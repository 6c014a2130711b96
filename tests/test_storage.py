"""Path handling, atomic writes and range reads on local disk, memory:// and S3."""

from __future__ import annotations

import pickle

import pytest

from sar_dist.storage import Storage, display_url, join


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "", "a\\b", "a//b", "./a"])
def test_join_refuses_escaping_names(name):
    with pytest.raises(ValueError, match="unsafe"):
        join("/out", name)


def test_join_and_display():
    assert join("s3://b/out/", "m.safetensors") == "s3://b/out/m.safetensors"
    assert join("/x", ".sar_dist", "a.json") == "/x/.sar_dist/a.json"
    assert display_url("https://user:pw@host/p") == "https://host/p"


def _urls(tmp_path, s3_options):
    return [(str(tmp_path / "d"), {}), (f"memory://st-{tmp_path.name}/d", {}), ("s3://st-bucket/d", s3_options)]


def test_roundtrip_and_atomic_write(tmp_path, s3_options):
    for base, options in _urls(tmp_path, s3_options):
        storage = pickle.loads(pickle.dumps(Storage(options)))  # ships to workers
        if base.startswith("s3://"):
            storage._remote(base)[0].mkdir("st-bucket")
        url = join(base, "f.bin")
        storage.write_bytes(url, b"0123456789")
        assert storage.exists(url) and storage.size(url) == 10
        assert bytes(storage.read_range(url, 2, 6)) == b"2345"
        assert storage.listdir(base) == ["f.bin"]
        with pytest.raises(RuntimeError):
            with storage.open_write(join(base, "g.bin")) as f:
                f.write(b"partial")
                raise RuntimeError("boom")
        assert not storage.exists(join(base, "g.bin")), base
        assert storage.listdir(base) == ["f.bin"], base
        storage.remove(url)
        assert not storage.exists(url)


def test_remove_partials_of_killed_writers(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    # a writer SIGKILLed inside open_write leaves its temporary file behind
    code = (
        "import os, signal, sys\n"
        "from sar_dist.storage import Storage\n"
        "with Storage().open_write(sys.argv[1]) as f:\n"
        "    f.write(b'half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(out / "m-1.safetensors")])
    assert p.returncode == -signal.SIGKILL
    (out / ".other.safetensors.x.partial").write_bytes(b"not ours")
    (out / "m-2.safetensors").write_bytes(b"done")
    leftovers = [n for n in os.listdir(out) if n.startswith(".m-1.safetensors.")]
    assert len(leftovers) == 1 and not (out / "m-1.safetensors").exists()

    removed = Storage().remove_partials(str(out), ["m-1.safetensors", "m-2.safetensors"])
    assert removed == leftovers
    assert sorted(os.listdir(out)) == [".other.safetensors.x.partial", "m-2.safetensors"]
