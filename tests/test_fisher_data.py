"""Calibration data as RLVR teams have it: chat records rendered with the model's chat template,
verl-style parquet and gzipped JSONL. Tokens and target masks are checked against a reference
built here with transformers' own ``AutoTokenizer.apply_chat_template`` (token level: the turn's
targets are what the conversation through it adds to the conversation before it with the
generation prompt); the statistics against the plain-PyTorch reference of ``tests/test_fisher.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from sar_dist.cli import main
from sar_dist.fisher.config import FisherJob
from sar_dist.fisher.data import load_examples
from sar_dist.fisher.plan import build_fisher_plan
from sar_dist.fisher.run import run_fisher
from sar_dist.storage import Storage
from sar_dist.synthetic import CHAT_TEMPLATE, LlamaShape, make_base, write_chat_tokenizer
from tests.conftest import REPO
from tests.test_fisher import _assert_close, _stats, reference_fisher
from tests.test_fisher import _write_jsonl as _jsonl

SHAPE = LlamaShape(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64, vocab=128)
NUM = 5


def _w(g: torch.Generator, n: int) -> str:
    return " ".join(f"w{i}" for i in torch.randint(0, 100, (n,), generator=g).tolist())


def _conversations() -> list[list[dict]]:
    """Chats ending with an assistant turn, one to three of them, some with a system turn."""
    g = torch.Generator().manual_seed(1)
    out = []
    for k in range(NUM):
        msgs = [{"role": "system", "content": _w(g, 2)}] if k % 2 else []
        for _ in range(1 + k % 3):
            msgs += [{"role": "user", "content": _w(g, 2 + k % 3)}, {"role": "assistant", "content": _w(g, 1 + k % 4)}]
        out.append(msgs)
    return out


def _verl_rows() -> list[dict]:
    """verl's layout: the prompt as chat messages, the sampled response, and columns we never read."""
    return [{"data_source": "openai/gsm8k", "prompt": c[:-1], "ability": "math", "response": c[-1]["content"],
             "reward_model": {"style": "rule", "ground_truth": str(k)}, "extra_info": {"index": k, "split": "train"}}
            for k, c in enumerate(_conversations())]


def _write_parquet(path: Path, rows: list[dict], row_group_size: int = 2) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=row_group_size)
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fisher-data")
    storage = Storage()
    make_base(storage, str(root / "model"), SHAPE, seed=3)
    write_chat_tokenizer(storage, str(root / "tok"), SHAPE.vocab)
    write_chat_tokenizer(storage, str(root / "tok-jinja"), SHAPE.vocab, jinja_file=True)
    write_chat_tokenizer(storage, str(root / "tok-none"), SHAPE.vocab, template=None)
    convs = _conversations()
    messages = _jsonl(root / "messages.jsonl", [{"messages": c, "id": k} for k, c in enumerate(convs)])
    gz = root / "messages.jsonl.gz"
    gz.write_bytes(gzip.compress(Path(messages).read_bytes()))
    return {
        "root": str(root), "model": str(root / "model"), "tok": str(root / "tok"),
        "tok-jinja": str(root / "tok-jinja"), "tok-none": str(root / "tok-none"),
        "messages": messages, "gz": str(gz),
        "chat_pr": _jsonl(root / "chat_pr.jsonl", [{"prompt": c[:-1], "response": c[-1]["content"]} for c in convs]),
        "parquet": _write_parquet(root / "rollouts.parquet", _verl_rows()),
    }


def _hf(tok_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def _ids(tok, msgs: list[dict], gen: bool = False, template: str | None = None) -> list[int]:
    return list(tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False,
                                        chat_template=template))


def reference_chat(tok, msgs: list[dict], turns: str = "last", template: str | None = None):
    assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    targets = assistant[-1:] if turns == "last" else assistant
    full = _ids(tok, msgs[: targets[-1] + 1], template=template)
    labels = [-100] * len(full)
    for i in targets:
        head, through = _ids(tok, msgs[:i], gen=True, template=template), _ids(tok, msgs[: i + 1], template=template)
        assert through[: len(head)] == head and full[: len(through)] == through
        labels[len(head): len(through)] = through[len(head):]
    return full, labels


def _load(url: str, tok: str, **kw):
    return load_examples(Storage(), url, vocab_size=SHAPE.vocab, max_length=512, tokenizer_url=tok, **kw)


def _pairs(data) -> list[tuple[list[int], list[int]]]:
    return [(list(e.input_ids), list(e.labels)) for e in data.examples]


# --- tokens and targets ----------------------------------------------------------------

@pytest.mark.parametrize("turns", ["last", "all"])
def test_messages_tokens_match_apply_chat_template(inputs, turns):
    tok = _hf(inputs["tok"])
    data = _load(inputs["messages"], inputs["tok"], chat_targets=turns)
    assert data.format == "messages" and data.num_records == NUM
    assert _pairs(data) == [reference_chat(tok, c, turns) for c in _conversations()]
    assert data.chat_template_sha256 == hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()
    # targets are the turn's words and the end-of-turn token, never the headers
    first = _conversations()[0]
    ids, labels = _pairs(data)[0]
    assert [y for y in labels if y != -100][:-1] == tok(first[-1]["content"], add_special_tokens=False)["input_ids"]
    assert labels[-1] == tok.convert_tokens_to_ids("<|end|>")


def test_turns_after_the_last_assistant_are_dropped_and_template_file(inputs, tmp_path):
    conv = _conversations()[3] + [{"role": "user", "content": "w1 w2"}]
    url = _jsonl(tmp_path / "d.jsonl", [{"messages": conv}])
    got = _pairs(_load(url, inputs["tok-jinja"]))  # the template from chat_template.jinja
    assert got == [reference_chat(_hf(inputs["tok"]), conv)]


def test_chat_prompt_response_parquet_and_gz_give_the_same_examples(inputs):
    ref = [reference_chat(_hf(inputs["tok"]), c) for c in _conversations()]
    chat_pr = _load(inputs["chat_pr"], inputs["tok"])
    parquet = _load(inputs["parquet"], inputs["tok"])
    gz = _load(inputs["gz"], inputs["tok"])
    assert chat_pr.format == parquet.format == "chat_prompt_response" and gz.format == "messages"
    assert parquet.container == "parquet" and gz.container == "jsonl.gz"
    assert _pairs(chat_pr) == _pairs(parquet) == _pairs(gz) == ref
    assert parquet.sha256 == hashlib.sha256(Path(inputs["parquet"]).read_bytes()).hexdigest()
    assert gz.sha256 == hashlib.sha256(Path(inputs["gz"]).read_bytes()).hexdigest()


def test_parquet_streams_row_groups_reading_only_needed_columns(inputs, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    rows = [{"conv": c, "data_source": "x", "reward_model": {"ground_truth": "1"}} for c in _conversations()]
    url = _write_parquet(tmp_path / "m.parquet", rows, row_group_size=2)
    calls: list[tuple[int, list[str]]] = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        calls.append((i, list(columns)))
        return original(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    data = _load(url, inputs["tok"], messages_key="conv")
    assert calls == [(0, ["conv"]), (1, ["conv"]), (2, ["conv"])]
    assert _pairs(data) == [reference_chat(_hf(inputs["tok"]), c) for c in _conversations()]


def test_chat_template_override_changes_tokens_sha_and_job_id(inputs, tmp_path):
    other = CHAT_TEMPLATE.replace("' <|end|> '", "' </s> <|end|> '")
    tok = _hf(inputs["tok"])
    data = _load(inputs["messages"], inputs["tok"], chat_template=other)
    assert _pairs(data) == [reference_chat(tok, c, template=other) for c in _conversations()]
    assert data.chat_template_sha256 == hashlib.sha256(other.encode()).hexdigest()
    tfile = tmp_path / "t.jinja"
    tfile.write_text(other)
    assert _pairs(_load(inputs["messages"], inputs["tok"], chat_template=str(tfile))) == _pairs(data)

    def plan(**kw):
        return build_fisher_plan(FisherJob.from_dict({"model": inputs["model"], "data": inputs["messages"],
                                                      "tokenizer": inputs["tok"], "output": str(tmp_path / "o"),
                                                      **kw}))
    a, b, c = plan(), plan(chat_template=other), plan(chat_targets="all")
    assert len({a.job_id, b.job_id, c.job_id}) == 3
    assert a.data.chat_template_sha256 != b.data.chat_template_sha256


def test_parquet_and_gz_from_s3(inputs, s3_options):
    storage = Storage(s3_options)
    storage._remote("s3://x")[0].mkdir("fisher-data")
    ref = _pairs(_load(inputs["messages"], inputs["tok"]))
    for name in ("parquet", "gz"):
        url = f"s3://fisher-data/{Path(inputs[name]).name}"
        storage.write_bytes(url, Path(inputs[name]).read_bytes())
        data = load_examples(storage, url, vocab_size=SHAPE.vocab, max_length=512, tokenizer_url=inputs["tok"])
        assert _pairs(data) == ref and data.sha256 == hashlib.sha256(Path(inputs[name]).read_bytes()).hexdigest()


# --- bad input -----------------------------------------------------------------------------

GOOD_MSG = {"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"messages": "w1 w2"}, "line 2: 'messages' must be a non-empty list of chat messages"),
        ({"messages": [{"role": "user"}]}, "line 2: 'messages'[0].content must be a string"),
        ({"messages": [{"role": "user", "content": "w1"}]}, "line 2: 'messages' has no assistant turn"),
        ({"messages": [7]}, "line 2: 'messages'[0] must be an object"),
        ({"prompt": [{"role": "user", "content": "w1"}], "response": "w2"},
         'line 2: a {"prompt": [messages],"response"} record in a file of {"messages"} records'),
        ({"messages": GOOD_MSG["messages"], "text": "w1"}, "line 2: mixes record formats"),
    ],
    ids=["not-list", "no-content", "no-assistant", "not-object", "mixed", "mixes"],
)
def test_bad_chat_lines_are_named(inputs, tmp_path, bad, message):
    url = _jsonl(tmp_path / "d.jsonl", [GOOD_MSG, bad])
    with pytest.raises(ValueError, match=r"^data .*d\.jsonl ") as e:
        _load(url, inputs["tok"])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"prompt": None}, "row 3: 'prompt' must be a string or a list of chat messages"),
        ({"response": ""}, "row 3: empty 'response'"),
        ({"prompt": [{"role": None, "content": "w1"}]}, "row 3: 'prompt'[0].role must be a string"),
        ({"prompt": []}, "row 3: 'prompt' must be a non-empty list of chat messages"),
    ],
    ids=["null-prompt", "empty-response", "null-role", "empty-prompt"],
)
def test_bad_parquet_rows_are_named(inputs, tmp_path, patch, message):
    rows = _verl_rows()
    rows[3].update(patch)
    url = _write_parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(ValueError) as e:
        _load(url, inputs["tok"])
    assert message in str(e.value) and "d.parquet" in str(e.value) and "\n" not in str(e.value)


def test_bad_containers_and_templates(inputs, tmp_path):
    gz = tmp_path / "bad.jsonl.gz"
    gz.write_bytes(gzip.compress(((json.dumps(GOOD_MSG) + "\n") * 2 + "{oops\n").encode()))
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz line 3: not valid JSON"):
        _load(str(gz), inputs["tok"])
    gz.write_bytes(gzip.compress(json.dumps(GOOD_MSG).encode() * 50)[:40])
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz: not valid gzip data"):
        _load(str(gz), inputs["tok"])
    fake = tmp_path / "fake.parquet"
    fake.write_text(json.dumps(GOOD_MSG) + "\n")
    with pytest.raises(ValueError, match=r"fake\.parquet: not a parquet file"):
        _load(str(fake), inputs["tok"])
    with pytest.raises(ValueError, match=r"cols\.parquet: no column 'prompt', 'response', 'messages'.*columns: data_source"):
        _load(_write_parquet(tmp_path / "cols.parquet", [{"data_source": "x"}]), inputs["tok"])
    with pytest.raises(ValueError, match=r"messages\.jsonl line 1: a chat record, but tokenizer .*tok-none has no chat "
                                         r"template .*set 'chat_template:'"):
        _load(inputs["messages"], inputs["tok-none"])
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}" \
             "{% endif %}{{ m['content'] + ' ' }}{% endfor %}"
    with pytest.raises(ValueError, match=r"messages\.jsonl line 2: the chat template fails on this record "
                                         r"\(.*no system turns\)"):
        _load(inputs["messages"], inputs["tok"], chat_template=strict)
    no_prefix = "{% for m in messages %}{{ m['content'] + ' ' }}{% endfor %}" \
                "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
    with pytest.raises(ValueError, match=r"messages\.jsonl line 1: the chat template does not render assistant turn 1 "
                                         r"as a continuation"):
        _load(inputs["messages"], inputs["tok"], chat_template=no_prefix)


@pytest.mark.parametrize("case", ["jsonl-line", "parquet-row", "no-template", "template-flag"])
def test_cli_exits_2_naming_line_or_row_and_writes_nothing(inputs, tmp_path, capsys, case):
    tok, flags = inputs["tok"], []
    if case == "jsonl-line":
        data, want = _jsonl(tmp_path / "d.jsonl", [GOOD_MSG, GOOD_MSG, {"messages": []}]), "d.jsonl line 3: "
    elif case == "parquet-row":
        rows = _verl_rows()
        rows[2]["response"] = ""
        data, want = _write_parquet(tmp_path / "d.parquet", rows), "d.parquet row 2: empty 'response'"
    elif case == "no-template":
        data, tok, want = inputs["messages"], inputs["tok-none"], "has no chat template"
    else:  # the flag reaches the loader: its template file is read, and here it is missing
        data, tok, want = inputs["messages"], inputs["tok-none"], "missing.jinja: file not found"
        flags = ["--chat-template", str(tmp_path / "missing.jinja"), "--chat-targets", "all"]
    out = tmp_path / "out"
    code = main(["fisher", "--model", inputs["model"], "--data", data, "--tokenizer", tok, "--output", str(out),
                 *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and want in err and len(err.splitlines()) == 1, err
    assert not out.exists()


# --- statistics ------------------------------------------------------------------------------

def test_chat_jsonl_and_verl_parquet_statistics_equal_reference(inputs, tmp_path, ray_local):
    """The same rollouts as {"messages"} JSONL and as verl parquet (through the shipped config):
    identical statistics, equal to the plain-PyTorch reference on the template's tokens."""
    ref_examples = [reference_chat(_hf(inputs["tok"]), c) for c in _conversations()]
    ref = reference_fisher(inputs["model"], ref_examples)

    a = str(tmp_path / "a")
    job = FisherJob.from_dict({"model": inputs["model"], "data": inputs["messages"], "tokenizer": inputs["tok"],
                               "output": a})
    ma = run_fisher(build_fisher_plan(job), poll_s=0.5)

    config = yaml.safe_load((REPO / "configs" / "fisher" / "verl_rollouts.yaml").read_text())
    b = str(tmp_path / "b")
    config.update(model=inputs["model"], data=inputs["parquet"], tokenizer=inputs["tok"], output=b)
    mb = run_fisher(build_fisher_plan(FisherJob.from_dict(config, where="verl_rollouts.yaml")), poll_s=0.5)

    assert ma["data"]["format"] == "messages" and mb["data"]["format"] == "chat_prompt_response"
    assert ma["data"]["container"] == "jsonl" and mb["data"]["container"] == "parquet"
    template = hashlib.sha256(_hf(inputs["tok"]).chat_template.encode()).hexdigest()
    assert ma["data"]["chat_template_sha256"] == mb["data"]["chat_template_sha256"] == template
    assert ma["num_examples"] == mb["num_examples"] == NUM
    assert ma["num_target_tokens"] == mb["num_target_tokens"] == sum(
        sum(1 for y in labels[1:] if y != -100) for _, labels in ref_examples)
    sa, sb = _stats(a), _stats(b)
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert ma["shards"] == mb["shards"]
    _assert_close(sa, ref)
