"""safetensors header bytes, streaming writer and range reader."""

from __future__ import annotations

import pytest
import safetensors.torch as st
import torch

from sar_dist.checkpoint.format import TORCH_TO_ST, build_header, order_for_writing, parse_header
from sar_dist.checkpoint.index import TensorRef, read_header
from sar_dist.checkpoint.reader import read_tensor
from sar_dist.checkpoint.writer import SAFETENSORS_METADATA, ShardWriter
from sar_dist.storage import Storage


def _write(storage: Storage, url: str, tensors: dict[str, torch.Tensor]) -> None:
    entries = order_for_writing([(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()])
    with ShardWriter(storage, url, entries) as w:
        for n, _, _ in entries:
            w.write(n, tensors[n])


def test_golden_bytes_2x2():
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    header, spans = build_header([("x", "F32", (2, 2))], SAFETENSORS_METADATA)
    expected_json = b'{"__metadata__":{"format":"pt"},"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}'
    assert header == (88).to_bytes(8, "little") + expected_json
    assert len(header) % 8 == 0 and spans == [("x", 96, 16)]
    ours = header + t.numpy().tobytes()
    assert ours == st.save({"x": t}, metadata={"format": "pt"})


@pytest.mark.parametrize("url_kind", ["local", "memory"])
def test_writer_matches_safetensors_and_roundtrips(tmp_path, url_kind):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(5, 3, generator=g).bfloat16(),
        "a.weight": torch.randn(4, generator=g),
        "c.half": torch.randn(2, 2, 2, generator=g).half(),
        "d.fp8": torch.randn(3, 3, generator=g).to(torch.float8_e4m3fn),
        "e.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 4),
    }
    storage = Storage()
    url = str(tmp_path / "x.safetensors") if url_kind == "local" else f"memory://fmt-{tmp_path.name}/x.safetensors"
    _write(storage, url, tensors)
    data = storage.read_bytes(url)
    assert data == st.save(tensors, metadata={"format": "pt"})  # byte-identical to the reference writer
    infos, meta, size, _ = read_header(storage, url)
    assert meta == {"format": "pt"} and size == len(data)
    for name, t in tensors.items():
        got = read_tensor(storage, TensorRef(file=url, info=infos[name]))
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got.view(torch.uint8) if t.dtype.is_floating_point and t.element_size() == 1 else got,
                           t.view(torch.uint8) if t.dtype.is_floating_point and t.element_size() == 1 else t)
    rows = read_tensor(storage, TensorRef(file=url, info=infos["b.weight"]), rows=(1, 4))
    assert torch.equal(rows, tensors["b.weight"][1:4])


def test_writer_streams_row_blocks_and_aborts_on_error(tmp_path):
    storage = Storage()
    t = torch.randn(10, 4)
    url = str(tmp_path / "s.safetensors")
    with ShardWriter(storage, url, [("t", "F32", (10, 4))]) as w:
        w.write("t", t[:3])
        w.write("t", t[3:])
    assert storage.read_bytes(url) == st.save({"t": t}, metadata={"format": "pt"})

    bad = str(tmp_path / "bad.safetensors")
    with pytest.raises(RuntimeError):
        with ShardWriter(storage, bad, [("t", "F32", (10, 4))]) as w:
            w.write("t", t[:3])
            raise RuntimeError("worker died")
    assert not storage.exists(bad) and list(tmp_path.iterdir()) == [tmp_path / "s.safetensors"]
    with pytest.raises(AssertionError, match="wrote 0 of 1"):
        with ShardWriter(storage, bad, [("t", "F32", (10, 4))]):
            pass
    assert not storage.exists(bad)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:5], "not a safetensors file"),
        (lambda b: (10**9).to_bytes(8, "little") + b[8:], "corrupt or truncated"),
        (lambda b: b[:8] + b"[" + b[9:], "corrupt safetensors header"),
        (lambda b: b[:-4], "truncated: tensor 'x'"),
        (lambda b: b[:8] + b[8:].replace(b'"F32"', b'"F33"'), "unsupported dtype"),
        (lambda b: b[:8] + b[8:].replace(b"[0,16]", b"[0,12]"), "spans 12 bytes"),
    ],
)
def test_corrupt_headers_are_named(tmp_path, mutate, message):
    good = st.save({"x": torch.zeros(2, 2)}, metadata={"format": "pt"})
    path = tmp_path / "m.safetensors"
    path.write_bytes(mutate(good))
    with pytest.raises(ValueError, match=message) as e:
        read_header(Storage(), str(path))
    assert str(path) in str(e.value)


def test_parse_header_asks_for_more_bytes():
    data = st.save({f"t{i}": torch.zeros(1) for i in range(50)})
    need = parse_header(data[:16], len(data), "x")
    assert isinstance(need, int) and need > 16
    _, tensors, _ = parse_header(data[:need], len(data), "x")
    assert len(tensors) == 50
