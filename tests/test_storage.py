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
    Storage(s3_options)._remote("s3://st-bucket")[0].makedirs("st-bucket", exist_ok=True)
    return [(str(tmp_path / "d"), {}), (f"memory://st-{tmp_path.name}/d", {}), ("s3://st-bucket/d", s3_options)]


def test_roundtrip_and_atomic_write(tmp_path, s3_options):
    for base, options in _urls(tmp_path, s3_options):
        storage = pickle.loads(pickle.dumps(Storage(options)))  # ships to workers
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


@pytest.mark.parametrize("concurrency", [1, 3, 16])
def test_read_many_in_parts_with_requests_in_flight(tmp_path, s3_options, monkeypatch, concurrency):
    import os

    import sar_dist.storage as storage_module

    monkeypatch.setattr(storage_module, "READ_PART_BYTES", 1000)  # many parts from small files
    data = [os.urandom(10_007), os.urandom(3_000), b"x" * 5]
    for base, options in _urls(tmp_path, s3_options):
        storage = Storage(options)
        urls = [f"{base}/f{i}.bin" for i in range(len(data))]
        for url, blob in zip(urls, data, strict=True):
            storage.write_bytes(url, blob)
        wanted = [(urls[0], 7, 9_000), (urls[1], 0, 3_000), (urls[2], 2, 3), (urls[0], 0, 0)]
        bufs = [bytearray(n) for _, _, n in wanted]
        storage.read_many([(u, s, memoryview(b)) for (u, s, _), b in zip(wanted, bufs, strict=True)],
                          concurrency=concurrency)
        for (u, s, n), b in zip(wanted, bufs, strict=True):
            assert bytes(b) == data[urls.index(u)][s : s + n], (base, u, s, n)
        with pytest.raises(EOFError, match="f1.bin"):
            storage.read_many([(urls[1], 2_500, memoryview(bytearray(1_000)))], concurrency=concurrency)
        if "://" in base:
            with pytest.raises(OSError, match="missing.bin"):
                storage.read_many([(urls[0], 0, memoryview(bytearray(2_500))),
                                   (f"{base}/missing.bin", 0, memoryview(bytearray(2_500)))], concurrency=concurrency)


def test_read_many_requests_in_flight_through_a_proxy(s3_server, s3_options, monkeypatch):
    import os

    import sar_dist.storage as storage_module
    from tests.faultproxy import FaultProxy

    monkeypatch.setattr(storage_module, "READ_PART_BYTES", 4096)
    blob = os.urandom(64 * 4096)
    Storage(s3_options)._remote("s3://st-bucket")[0].makedirs("st-bucket", exist_ok=True)
    Storage(s3_options).write_bytes("s3://st-bucket/proxy/blob", blob)
    with FaultProxy(s3_server, delay_s=0.05) as proxy:
        storage = Storage({"client_kwargs": {"endpoint_url": proxy.url}})
        out = bytearray(len(blob) - 1)
        storage.read_many([("s3://st-bucket/proxy/blob", 1, memoryview(out))], concurrency=16)
        assert bytes(out) == blob[1:]
        assert proxy.requests == 64 and proxy.max_in_flight > 1
