"""Our safetensors header parser against the ``safetensors`` library as the oracle.

Every case is a small file whose header was mutated; both parsers must accept it or both
must refuse it, and where both accept they must agree on names, dtypes, shapes, tensor
bytes (hence offsets) and metadata. The one allowed difference: a header the library
accepts that holds a dtype sar-dist cannot decode (``U16``, ``F4``, ...) is refused by us
with an "unsupported dtype ... cannot decode" message.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import struct
from pathlib import Path

import pytest
import safetensors
import safetensors.torch as st
import torch
from safetensors import safe_open

from sar_dist.checkpoint.format import DTYPES, MAX_HEADER_BYTES, SAFETENSORS_DTYPE_BITS, parse_header

Tensors = dict[str, tuple[str, tuple[int, ...], bytes]]
Outcome = tuple[Tensors, dict[str, str]] | str  # accepted (tensors, metadata) or the refusal


def _library(path: Path, blob: bytes) -> Outcome:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except safetensors.SafetensorError as e:
        return str(e)
    data = {name: bytes(view["data"]) for name, view in safetensors.deserialize(blob)}
    return {k: (dtype, shape, data[k]) for k, (dtype, shape) in shapes.items()}, metadata


def _ours(blob: bytes, where: str) -> Outcome:
    try:
        parsed = parse_header(blob, len(blob), where)
    except ValueError as e:
        return str(e)
    assert not isinstance(parsed, int)
    _, infos, metadata = parsed
    tensors = {k: (i.dtype, i.shape, blob[i.offset : i.offset + i.nbytes]) for k, i in infos.items()}
    return tensors, metadata


def check(tmp_path: Path, blob: bytes) -> str:
    """Hold both parsers to the same verdict on ``blob``; return which one it was."""
    path = tmp_path / "case.safetensors"
    path.write_bytes(blob)
    lib, ours = _library(path, blob), _ours(blob, str(path))
    shown = f"header {blob[:300]!r}, library: {lib if isinstance(lib, str) else 'accepts'}, ours: {ours}"
    if isinstance(ours, str):
        assert "\n" not in ours and ours.startswith(f"{path}: "), shown
    if isinstance(lib, str):
        assert isinstance(ours, str), f"we accept what the library refuses: {shown}"
        return "both refuse"
    if isinstance(ours, str):
        # the only allowed difference: the library accepts a dtype sar-dist cannot decode
        undecodable = {dtype for dtype, _, _ in lib[0].values()} - DTYPES.keys()
        assert undecodable and "unsupported dtype" in ours and "cannot decode" in ours, shown
        return "undecodable dtype"
    assert ours == lib, shown
    return "both accept"


# ---------------------------------------------------------------- building headers


def render(obj: dict[str, object], data: bytes, pad: str = " ") -> bytes:
    """A safetensors file: the compact JSON of ``obj``, padded to 8 bytes with ``pad``."""
    text = json.dumps(obj, separators=(",", ":")).encode()
    if pad:
        text += pad.encode() * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def from_text(text: str, data: bytes = b"") -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data


def split(blob: bytes) -> tuple[dict[str, object], bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _bases() -> list[tuple[dict[str, object], bytes]]:
    g = torch.Generator().manual_seed(0)
    mixed = {
        "w": torch.randn(4, 2, generator=g),
        "b": torch.randn(3, generator=g).bfloat16(),
        "ids": torch.arange(2, dtype=torch.int64),
        "s": torch.tensor(1.5).half(),
        "e": torch.zeros(0, 5),
        "m": torch.arange(5, dtype=torch.uint8),
    }
    # by hand: dtypes only the library knows, entries out of data order, no metadata
    odd = {
        "c": {"dtype": "F32", "shape": [1], "data_offsets": [6, 10]},
        "a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]},
        "u": {"dtype": "U16", "shape": [2], "data_offsets": [2, 6]},
    }
    return [
        split(st.save(mixed, metadata={"format": "pt"})),
        split(st.save({"x": torch.ones(2, 2, dtype=torch.int32)})),
        (odd, bytes(range(10))),
    ]


# ---------------------------------------------------------------- mutations

LIB_DTYPES = sorted(SAFETENSORS_DTYPE_BITS)
WEIRD = [64.5, 64.0, 0.5, -1, "64", "", True, False, None, [], {}, 2**63, 2**64 - 1, 2**64, 10**30, 1e300, 0]
BAD_DTYPES = ["f32", "F33", "", "float32", 32, None, ["F32"], {"F32": None}, {"F32": 1}, {"F32": None, "F16": None}, {}]


def _tensors(obj: dict[str, object]) -> list[str]:
    return [k for k in obj if k != "__metadata__"]


def _entry(rng: random.Random, obj: dict[str, object]) -> dict[str, object] | None:
    names = [k for k in _tensors(obj) if isinstance(obj[k], dict)]
    return obj[rng.choice(names)] if names else None  # type: ignore[return-value]


def m_element(rng, obj, data):
    """One element of a shape or of data_offsets becomes something else."""
    entry = _entry(rng, obj)
    field = rng.choice(["shape", "data_offsets"])
    if entry is None or not isinstance(entry.get(field), list) or not entry[field]:
        return data
    i = rng.randrange(len(entry[field]))
    v = entry[field][i]
    near = [v + 1, v - 1, v * 2, float(v), str(v), -v] if type(v) is int else []
    entry[field][i] = rng.choice(WEIRD + near * 2)
    return data


def m_field(rng, obj, data):
    """A whole field is replaced, dropped, renamed or joined by an unknown one."""
    entry = _entry(rng, obj)
    if entry is None:
        return data
    field = rng.choice(["dtype", "shape", "data_offsets"])
    op = rng.randrange(5)
    if op == 0:
        entry.pop(field, None)
    elif op == 1 and field in entry:
        entry[rng.choice([field.upper(), field + " ", "Shape", "offsets"])] = entry.pop(field)
    elif op == 2:
        entry[rng.choice(["extra", "__metadata__", "dtypes", "offset"])] = rng.choice(WEIRD + [{"a": [1, {"b": None}]}])
    elif field == "dtype":
        entry["dtype"] = rng.choice(LIB_DTYPES + list(DTYPES) + BAD_DTYPES)
    else:
        entry[field] = rng.choice([[], [1], [0, 0], [0, 0, 0], [[2], 2], "F32", 5, None, {}, {"0": 0, "1": 4}])
    return data


def m_entry_form(rng, obj, data):
    """An entry becomes a [dtype, shape, offsets] list (serde reads that too), or junk."""
    names = _tensors(obj)
    if not names:
        return data
    name = rng.choice(names)
    entry = obj[name]
    if isinstance(entry, dict) and rng.random() < 0.7:
        items = [entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")]
        obj[name] = rng.choice([items, items, items[:2], items + [0], items[::-1]])
    else:
        obj[name] = rng.choice([None, 5, "x", [], {}, [None, None, None]])
    return data


def m_offsets(rng, obj, data):
    """Offsets move: gaps, overlaps, swaps, reversed, shifted together."""
    entry = _entry(rng, obj)
    offsets = entry and entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)):
        return data
    k = rng.choice([1, 2, 4, 8, -1, -4])
    op = rng.randrange(5)
    if op == 0:
        entry["data_offsets"] = [offsets[0] + k, offsets[1] + k]
    elif op == 1:
        entry["data_offsets"] = [offsets[0] + k, offsets[1]]
    elif op == 2:
        entry["data_offsets"] = [offsets[0], offsets[1] + k]
    elif op == 3:
        entry["data_offsets"] = offsets[::-1]
    else:
        other = _entry(rng, obj)
        if other is not None and "data_offsets" in other:
            entry["data_offsets"], other["data_offsets"] = other["data_offsets"], offsets
    return data


def m_shape(rng, obj, data):
    """Shapes change: same element count (still valid) or not, and dtypes change width or not."""
    entry = _entry(rng, obj)
    shape = entry and entry.get("shape")
    if not (isinstance(shape, list) and all(type(d) is int for d in shape)):
        return data
    op = rng.randrange(6)
    if op == 0:
        entry["shape"] = rng.sample(shape, len(shape))
    elif op == 1:
        entry["shape"] = shape + [1] if rng.random() < 0.5 else [1] + shape
    elif op == 2:
        entry["shape"] = [math.prod(shape)]  # flattened
    elif op == 3 and shape:
        i = rng.randrange(len(shape))
        entry["shape"] = shape[:i] + [shape[i] + rng.choice([1, -1])] + shape[i + 1 :]
    elif op == 4:
        entry["shape"] = rng.choice([[], [0], shape + [0], [2**62, 4, 0], [0, 2**63, 2], [2**32, 2**32]])
    else:
        dtype = entry.get("dtype")
        bits = SAFETENSORS_DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
        same = [d for d in LIB_DTYPES if SAFETENSORS_DTYPE_BITS[d] == bits]
        entry["dtype"] = rng.choice(same * 3 + LIB_DTYPES) if same else rng.choice(LIB_DTYPES)
    return data


def m_metadata(rng, obj, data):
    value = rng.choice(
        [None, {}, {"a": 1}, {"a": None}, {"a": ["x"]}, {"a": {"b": "c"}}, [], "pt", 0, {"format": "pt", "k": "v"},
         {"": ""}, {"format": "np", "format2": "pt"}]
    )  # fmt: skip
    if rng.random() < 0.2:
        obj.pop("__metadata__", None)
    else:
        obj["__metadata__"] = value
    return data


def m_tensors(rng, obj, data):
    """A tensor is added (valid or not) or removed; data may grow or shrink to match."""
    names = _tensors(obj)
    op = rng.randrange(4)
    end = len(data)
    if op == 0 and names:
        del obj[rng.choice(names)]
    elif op == 1:
        obj["z"] = {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}
    elif op == 2:
        obj["z"] = {"dtype": "I16", "shape": [3], "data_offsets": [end, end + 6]}
        return data + bytes(range(6)) if rng.random() < 0.8 else data
    else:
        obj["z"] = {"dtype": "U8", "shape": [2], "data_offsets": [max(end - 1, 0), end + 1]}
        return data + b"\x01"
    return data


def m_deep(rng, obj, data):
    """An unknown field nested around serde_json's depth limit (127 in all)."""
    entry = _entry(rng, obj)
    if entry is None:
        return data
    depth = rng.choice([120, 124, 125, 126, 127, 300])
    value: object = rng.choice([[], {}, 1, "s"])
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    entry["deep"] = value
    return data


def b_keep_valid(rng, obj, data):
    """A change the library still accepts: same element count, same-width dtype, list or
    enum-map forms, unknown fields, other metadata, other key order, empty tensors."""
    names = _tensors(obj)
    entry = _entry(rng, obj)
    op = rng.randrange(8)
    if entry is not None and op < 4:
        shape = entry["shape"]
        if op == 0:
            entry["shape"] = rng.choice([shape[::-1], shape + [1], [1] + shape, [math.prod(shape)]])
        elif op == 1:
            bits = SAFETENSORS_DTYPE_BITS[entry["dtype"]] if isinstance(entry["dtype"], str) else 0
            entry["dtype"] = rng.choice([d for d in LIB_DTYPES if SAFETENSORS_DTYPE_BITS[d] == bits] or ["F32"])
        elif op == 2:
            entry["dtype"] = {entry["dtype"]: None} if isinstance(entry["dtype"], str) else entry["dtype"]
        else:
            entry[rng.choice(["extra", "dtypes", "Shape"])] = rng.choice([1, -0.5, None, "s", [1, [2]], {"a": {}}])
    elif op == 4 and names:
        name = rng.choice(names)
        if isinstance(obj[name], dict):
            obj[name] = [obj[name].get(f) for f in ("dtype", "shape", "data_offsets")]
    elif op == 5:
        obj["__metadata__"] = rng.choice([None, {}, {"format": "pt", "k": "v"}, {"": ""}, {"a": "\u00e9"}])
    elif op == 6:
        items = list(obj.items())
        rng.shuffle(items)
        obj.clear()
        obj.update(items)
    else:
        end = rng.choice([0, len(data)])  # an empty tensor fits at the start or the end
        obj["empty"] = {"dtype": rng.choice(LIB_DTYPES), "shape": [rng.randrange(3), 0], "data_offsets": [end, end]}
    return data


STRUCTURED = [m_element, m_field, m_entry_form, m_offsets, m_shape, m_metadata, m_tensors, m_deep]

INT_LITERAL = re.compile(r"(?<=[\[,:])-?\d+(?=[\],}])")


def t_number(rng, text):
    """An integer literal is rewritten as JSON serde and Python read differently."""
    spots = list(INT_LITERAL.finditer(text))
    if not spots:
        return text
    m = rng.choice(spots)
    v = m.group()
    new = rng.choice(
        ["-0", v + "e0", v + ".0", v + "E+0", "0" + v, "-" + v, "1e400", "-1e400", "1e-400", "NaN", "Infinity",
         "-Infinity", str(2**64), str(2**64 - 1), str(-(2**63) - 1), " " + v + " ", v + "0" * 25, "+" + v]
    )  # fmt: skip
    return text[: m.start()] + new + text[m.end() :]


def t_duplicate(rng, text):
    """A member of the top-level object or of an entry appears twice (maybe changed)."""
    obj = json.loads(text)
    key = rng.choice(list(obj) or ["__metadata__"])
    if rng.random() < 0.5 and isinstance(obj.get(key), dict) and obj[key]:
        field = rng.choice(list(obj[key]))
        member = json.dumps({field: obj[key][field]}, separators=(",", ":"))[1:-1]
        inner = json.dumps(obj[key], separators=(",", ":"))
        doubled = "{" + member + "," + inner[1:] if rng.random() < 0.5 else inner[:-1] + "," + member + "}"
        return text.replace(inner, doubled, 1)
    value = copy.deepcopy(obj.get(key))
    if isinstance(value, dict) and isinstance(value.get("shape"), list) and rng.random() < 0.5:
        value["shape"] = rng.choice([[64.5], ["2"], [0], value["shape"] + [1]])
    member = json.dumps({key: value}, separators=(",", ":"))[1:-1]
    return "{" + member + "," + text[1:] if rng.random() < 0.5 else text[:-1] + "," + member + "}"


def t_string(rng, text):
    """A key or string value is escaped, validly or not."""
    spots = list(re.finditer(r'"([A-Za-z_]+)"', text))
    if not spots:
        return text
    m = rng.choice(spots)
    s = m.group(1)
    i = rng.randrange(len(s))
    esc = rng.choice(
        [f"\\u{ord(s[i]):04x}", f"\\u{ord(s[i]):04X}", "\\ud800", "\\udc00", "\\ud83d\\ude00", "\\ud800\\u0041", "\\x",
         "\t", "\\/", "\\u0000", "é", "\\"]
    )  # fmt: skip
    return text[: m.start() + 1 + i] + esc + s[i + 1 :] + '"' + text[m.end() :]


def t_whitespace(rng, text):
    """Whitespace and junk around or inside the JSON."""
    where = rng.choice(["lead", "trail", "inside"])
    junk = rng.choice([" ", "\n", "\t", "\r", "\x00", "\x0c", "\ufeff", ",", "x", "{}", "\u00a0", " \n\t\r "])
    if where == "lead":
        return junk + text
    if where == "trail":
        return text + junk
    spots = [m.end() for m in re.finditer(r"[,:\[{]", text)]
    i = rng.choice(spots) if spots else 0
    return text[:i] + junk + text[i:]


TEXTUAL = [t_number, t_duplicate, t_string, t_whitespace]


def raw_bytes(rng, blob):
    """Random bytes of the header are flipped, replaced, dropped or added."""
    n = int.from_bytes(blob[:8], "little")
    out = bytearray(blob)
    for _ in range(rng.choice([1, 1, 2, 3])):
        i = rng.randrange(8, 8 + n) if n else 8
        op = rng.randrange(4)
        if op == 0 and i < len(out):
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and i < len(out):
            out[i] = rng.choice(b'{}[],:"0123456789-.eE \\nulltrue\x00\xff\xc3')
        elif op == 2 and i < len(out):
            del out[i]
            n -= 1
        else:
            out.insert(i, rng.choice(b'{}[],:"019- \\'))
            n += 1
    if rng.random() < 0.8:  # usually keep the length field in step with the edit
        out[:8] = struct.pack("<Q", n)
    return bytes(out)


def framing(rng, blob):
    """The length field or the data after the header is wrong."""
    n = int.from_bytes(blob[:8], "little")
    op = rng.randrange(3)
    if op == 0:
        new = rng.choice([n + 1, n - 1, n + 7, n - 8, n + 8, 0, 1, 2**64 - 1, MAX_HEADER_BYTES + 1, len(blob)])
        return struct.pack("<Q", max(new, 0)) + blob[8:]
    if op == 1:
        return blob + rng.choice([b"\x00", b" ", b"\x00" * 8])
    return blob[: len(blob) - rng.choice([1, 2, 8])] if len(blob) > 8 + n else blob[: len(blob) - 1]


def mutate(rng: random.Random, bases: list[tuple[dict[str, object], bytes]]) -> bytes:
    obj, data = copy.deepcopy(rng.choice(bases))
    kind = rng.choices(["valid", "structured", "textual", "raw", "framing"], weights=[3, 5, 3, 2, 1])[0]
    for _ in range(rng.choice([0, 1, 2, 3])):
        data = b_keep_valid(rng, obj, data)
    if kind != "valid":
        for op in rng.sample(STRUCTURED, rng.choice([1, 1, 2, 3]) if kind == "structured" else rng.choice([0, 0, 1])):
            data = op(rng, obj, data)
    pad = rng.choice([" ", " ", "", "\n"])
    if kind == "textual":
        text = json.dumps(obj, separators=(",", ":"))
        text = rng.choice(TEXTUAL)(rng, text)
        if pad:
            text += pad * (-len(text.encode("utf-8", "surrogatepass")) % 8)
        return from_text(text, data)
    blob = render(obj, data, pad)
    if kind == "raw":
        return raw_bytes(rng, blob)
    return framing(rng, blob) if kind == "framing" else blob


# ---------------------------------------------------------------- tests

SEEDS = range(8)
CASES_PER_SEED = 500


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_headers_agree_with_the_library(tmp_path, seed):
    rng = random.Random(seed)
    bases = _bases()
    verdicts: dict[str, int] = {}
    for _ in range(CASES_PER_SEED):
        verdict = check(tmp_path, mutate(rng, bases))
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
    # both sides must be exercised, or the agreement says little
    assert verdicts.get("both accept", 0) > CASES_PER_SEED // 10, verdicts
    assert verdicts.get("both refuse", 0) > CASES_PER_SEED // 3, verdicts


def test_bases_are_valid(tmp_path):
    for obj, data in _bases():
        assert check(tmp_path, render(obj, data)) in ("both accept", "undecodable dtype")


W = {"dtype": "F32", "shape": [64, 32], "data_offsets": [0, 8192]}


@pytest.mark.parametrize(
    "field, value",
    [
        ("shape", [64.5, 32]),  # the issue's three: truncated to [64, 32] and merged before
        ("data_offsets", [0.0, 8192]),
        ("data_offsets", [0, 8192.0]),
        ("shape", ["64", "32"]),
        ("shape", [64.0, 32]),
        ("shape", [True, 32]),
        ("data_offsets", ["0", "8192"]),
    ],
)
def test_issue_regressions_are_refused(tmp_path, field, value):
    blob = render({"__metadata__": {"format": "pt"}, "w": {**W, field: value}}, bytes(8192))
    assert check(tmp_path, blob) == "both refuse"
    with pytest.raises(ValueError, match=rf"case\.safetensors: corrupt safetensors header entry for tensor 'w': {field}"):
        parse_header(blob, len(blob), str(tmp_path / "case.safetensors"))


E = '"dtype":"F32","shape":[2],"data_offsets":[0,8]'  # valid for 8 bytes of data


def x(extra: str) -> str:
    """A header whose tensor 'x' is E plus ``extra`` members."""
    return '{"x":{' + E + extra + "}}"


@pytest.mark.parametrize(
    "text, accepted",
    [
        # what serde/safetensors makes of corners where Python's json differs
        ('{"x":["F32",[2],[0,8]]}', True),  # a struct may be a list
        ('{"x":["F32",[2],[0,8],0]}', False),
        ('{"x":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}}', True),  # enum as a map
        ('{"x":{"dtype":{"F32":1},"shape":[2],"data_offsets":[0,8]}}', False),
        (x(',"dtype":"F32"'), False),  # a duplicate field
        (x(',"a":1,"a":2'), True),  # unknown fields, even doubled, are ignored
        ('{"x":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]},' + x("")[1:], False),  # both are read
        ('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,8]},' + x("")[1:], True),  # the last wins
        ('{"__metadata__":null,"__metadata__":{},' + x("")[1:], False),
        ('{"__metadata__":{"a":"b","a":"c"},' + x("")[1:], True),
        ('{"__metadata__":null,' + x("")[1:], True),
        ('{"x":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}', False),  # -0 is a float to serde
        (x(',"z":-0'), True),
        (x(',"z":1e400'), False),  # Python reads inf
        (x(',"z":1' + "0" * 400), False),
        (x(',"z":NaN'), False),
        (x(',"z":18446744073709551616'), True),  # past u64 serde reads a float: fine here...
        ('{"x":{"dtype":"F32","shape":[18446744073709551616,0],"data_offsets":[8,8]},"y":{' + E + "}}", False),
        (x(',"z":"\\ud800"'), False),  # a lone surrogate; Python keeps it
        (x(',"z":"\\ud83d\\ude00"'), True),
        (x(',"z":' + "[" * 125 + "]" * 125), True),  # 127 nested containers in all
        (x(',"z":' + "[" * 126 + "]" * 126), False),  # 128
        (x(',"z":' + "[" * 5000 + "]" * 5000), False),  # Python: RecursionError
        ('{"x":{"dtype":"F32","shape":[0,9223372036854775808,2],"data_offsets":[8,8]},"y":{' + E + "}}", True),
        ('{"x":{"dtype":"F32","shape":[9223372036854775808,2,0],"data_offsets":[8,8]},"y":{' + E + "}}", False),
        ('{"x":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', False),  # half a byte left over
        ("\t" + x("") + "\r\n ", True),
        (x("") + "\x00", False),
        ("\ufeff" + x(""), False),
    ],
)
def test_library_corners(tmp_path, text, accepted):
    data = bytes(range(8)) if '"F4"' not in text else b"ab"
    verdict = check(tmp_path, from_text(text, data))
    assert verdict == ("both accept" if accepted else "both refuse")


def test_header_size_limit(tmp_path):
    # the library's limit is 100_000_000 bytes; a sparse file lets it refuse without our
    # writing 100 MB, and we refuse before asking for the header bytes
    path = tmp_path / "big.safetensors"
    for n, too_large in [(MAX_HEADER_BYTES, False), (MAX_HEADER_BYTES + 1, True)]:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", n))
            f.truncate(8 + n)
        with pytest.raises(safetensors.SafetensorError) as lib:
            safe_open(str(path), framework="pt")
        assert ("header too large" in str(lib.value)) == too_large
        prefix = struct.pack("<Q", n)
        if too_large:
            with pytest.raises(ValueError, match="corrupt or truncated safetensors header"):
                parse_header(prefix, 8 + n, str(path))
        else:
            assert parse_header(prefix, 8 + n, str(path)) == 8 + n
