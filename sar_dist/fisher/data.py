"""Calibration data: JSONL, gzipped JSONL or parquet records -> tokenized ``Example``s,
validated record by record.

Containers (by the file name; any fsspec URL): ``.jsonl`` (read whole), ``.jsonl.gz`` / ``.gz``
(decompressed as a stream, line by line) and ``.parquet`` (streamed one row group at a time,
reading only the columns the records need, as verl keeps RLVR data). A problem is named by its
line (JSONL, from 1) or its row (parquet, from 0, as pandas indexes it).

Record formats (one per file):

* ``{"prompt": str, "response": str}``: targets are the response tokens. The prompt is
  tokenized with the tokenizer's special tokens (e.g. BOS), the response without, and the
  two are concatenated; no chat template is applied.
* ``{"messages": [{"role","content"},...]}``: a chat, rendered with the model's chat template;
  targets are the tokens of the last assistant turn (``chat_targets: all``: of every one).
* ``{"prompt": [{"role","content"},...], "response": str}``: a chat prompt and the model's
  reply (verl's layout), rendered with the chat template; targets are the reply's tokens.
* ``{"text": str}``: targets are every token after the first.
* ``{"input_ids": [int], "labels": [int]?}``: already tokenized; ``labels`` aligned with
  ``input_ids`` (-100 = not a target; default: ``input_ids``), as Hugging Face's models take.

Chat records are rendered as transformers' ``apply_chat_template`` does (the template string
with ``messages``, the special tokens and ``add_generation_prompt``, then the tokenizer without
added special tokens). An assistant turn's targets are the tokens overlapping the characters
between the end of the conversation before it rendered with the generation prompt and the end
of the conversation through it (its content and whatever the template closes the turn with,
e.g. an end-of-turn token), as ``return_assistant_tokens_mask`` marks a ``{% generation %}``
span. Turns after the last target are dropped (they change no target's log-probability).

Other keys in a record are ignored; ``prompt_key``, ``response_key`` and ``messages_key`` name
the fields (columns) to take ``prompt``, ``response`` and ``messages`` from. Every problem is
reported before any worker starts. Records longer than ``max_length`` are truncated (counted)
or refused.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sar_dist.fisher.types import IGNORE_INDEX, Example
from sar_dist.storage import Storage, display_url, join

FORMATS = {
    "prompt_response": ("prompt", "response"),
    "messages": ("messages",),
    "text": ("text",),
    "tokenized": ("input_ids",),
}
CHAT_FORMATS = ("messages", "chat_prompt_response")
CHAT_TARGETS = ("last", "all")
# the files transformers reads a tokenizer and its chat template from
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json")
_CHUNK = 8 << 20


@dataclass(frozen=True, kw_only=True)
class CalibrationData:
    """Examples ready for the workers, and what ``fisher.json`` records about them.

    Attributes:
        examples: the examples used, in file order.
        format: ``prompt_response``, ``messages``, ``chat_prompt_response``, ``text`` or ``tokenized``.
        sha256: of the data file's bytes (as stored: compressed for ``.gz``).
        num_records: records in the file.
        truncated: examples cut to ``max_length``.
        tokenizer_sha256: of the tokenizer.json used (None for pre-tokenized data).
        chat_template_sha256: of the chat template used (None unless chat records).
        container: ``jsonl``, ``jsonl.gz`` or ``parquet``.
    """

    examples: tuple[Example, ...]
    format: str
    sha256: str
    num_records: int
    truncated: int
    tokenizer_sha256: str | None = None
    chat_template_sha256: str | None = None
    container: str = "jsonl"

    @property
    def num_targets(self) -> int:
        return sum(e.num_targets for e in self.examples)

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def load_tokenizer(storage: Storage, url: str) -> tuple[Any, str]:
    """A ``tokenizers.Tokenizer`` from ``URL/tokenizer.json``, and the file's sha256.

    Raises:
        ValueError: no ``tokenizer.json`` there, or not a valid one.
    """
    from tokenizers import Tokenizer

    raw = _tokenizer_json(storage, url)
    try:
        return Tokenizer.from_str(raw.decode("utf-8")), hashlib.sha256(raw).hexdigest()
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own types
        raise ValueError(f"{display_url(join(url, 'tokenizer.json'))}: cannot load the tokenizer ({e})") from None


def _tokenizer_json(storage: Storage, url: str) -> bytes:
    path = join(url, "tokenizer.json")
    if not storage.exists(path):
        raise ValueError(
            f"tokenizer {display_url(url)}: no tokenizer.json; text data needs one (set 'tokenizer:' to a "
            f"directory that has it, or give pre-tokenized {{\"input_ids\"}} records)"
        )
    return storage.read_bytes(path)


def load_chat_tokenizer(storage: Storage, url: str) -> tuple[Any, str, str | None]:
    """A transformers fast tokenizer from ``URL`` (tokenizer.json, tokenizer_config.json,
    chat_template.jinja, ...), the tokenizer.json's sha256, and its default chat template (None
    if it has none).

    Raises:
        ValueError: no ``tokenizer.json`` there, or transformers cannot load it.
    """
    from transformers import PreTrainedTokenizerFast

    raw = _tokenizer_json(storage, url)
    with tempfile.TemporaryDirectory(prefix="sar-dist-tokenizer-") as tmp:
        for name in _TOKENIZER_FILES:
            src = join(url, name)
            if storage.exists(src):
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(raw if name == "tokenizer.json" else storage.read_bytes(src))
        try:
            tok = PreTrainedTokenizerFast.from_pretrained(tmp, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many types
            msg = " ".join(str(e).split())[:300]
            raise ValueError(f"tokenizer {display_url(url)}: transformers cannot load it ({msg})") from None
    try:
        template = tok.get_chat_template()
    except ValueError:
        template = None
    return tok, hashlib.sha256(raw).hexdigest(), template


def is_template_file(value: str) -> bool:
    """Whether a ``chat_template`` setting names a ``.jinja`` file (else it is the template itself)."""
    return value.endswith(".jinja") and "{" not in value


def load_chat_template(storage: Storage, value: str) -> str:
    """The ``chat_template`` setting: a Jinja string, or the URL of a ``.jinja`` file."""
    if is_template_file(value):
        if not storage.exists(value):
            raise ValueError(f"chat_template {display_url(value)}: file not found")
        try:
            return storage.read_bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"chat_template {display_url(value)}: not UTF-8 text") from None
    return value


def load_examples(
    storage: Storage,
    url: str,
    *,
    vocab_size: int,
    max_length: int,
    overlength: str = "truncate",
    num_examples: int | None = None,
    tokenizer_url: str | None = None,
    chat_template: str | None = None,
    chat_targets: str = "last",
    prompt_key: str | None = None,
    response_key: str | None = None,
    messages_key: str | None = None,
) -> CalibrationData:
    """Read, validate and tokenize a calibration file (JSONL, JSONL.gz or parquet).

    Args:
        storage: where to read.
        url: the data file.
        vocab_size: token ids must be below it.
        max_length: most tokens per example.
        overlength: ``truncate`` or ``refuse``.
        num_examples: use the first this many records (all are validated).
        tokenizer_url: directory with ``tokenizer.json`` (needed unless pre-tokenized).
        chat_template: overrides the tokenizer's chat template (a Jinja string or a ``.jinja`` URL).
        chat_targets: ``last`` or ``all`` assistant turns of ``{"messages"}`` records.
        prompt_key, response_key, messages_key: the fields holding ``prompt``, ``response``
            and ``messages`` (default: those names).

    Raises:
        ValueError: one line naming the file and line (or row).
    """
    where = display_url(url)
    if chat_targets not in CHAT_TARGETS:
        raise ValueError(f"chat_targets: {chat_targets!r} is not one of {', '.join(CHAT_TARGETS)}")
    keys = {"prompt": prompt_key or "prompt", "response": response_key or "response",
            "messages": messages_key or "messages"}
    container = _container(url)
    if not storage.exists(url):
        raise ValueError(f"data {where}: file not found")
    if container == "parquet":
        sha, source = _file_sha256(storage, url), _parquet_records(storage, url, where, keys)
    elif container == "jsonl.gz":
        sha, source = _file_sha256(storage, url), _gzip_jsonl_records(storage, url, where)
    else:
        raw = storage.read_bytes(url)
        sha, source = hashlib.sha256(raw).hexdigest(), _jsonl_records(raw, where)

    records: list[tuple[str, dict[str, Any]]] = []
    fmt: str | None = None
    for at, rec in source:
        rec = _apply_keys(rec, keys)
        kind = _record_format(rec, at)
        if fmt is None:
            fmt = kind
        elif kind != fmt:
            raise ValueError(f"{at}: a {_describe(kind)} record in a file of {_describe(fmt)} records")
        records.append((at, rec))
    if fmt is None:
        raise ValueError(f"data {where}: no records")

    tokenizer = tokenizer_sha = template = template_sha = None
    if fmt in CHAT_FORMATS:
        if not tokenizer_url:
            raise ValueError(f"data {where}: chat records need a tokenizer with a chat template")
        tokenizer, tokenizer_sha, template = load_chat_tokenizer(storage, tokenizer_url)
        if chat_template is not None:
            template = load_chat_template(storage, chat_template)
        if not template:
            raise ValueError(
                f"{records[0][0]}: a chat record, but tokenizer {display_url(tokenizer_url)} has no chat template "
                f"(none in tokenizer_config.json or chat_template.jinja); set 'chat_template:' in the config"
            )
        template_sha = hashlib.sha256(template.encode("utf-8")).hexdigest()
    elif fmt != "tokenized":
        if not tokenizer_url:
            raise ValueError(f"data {where}: text records need a tokenizer")
        tokenizer, tokenizer_sha = load_tokenizer(storage, tokenizer_url)

    used = records if num_examples is None else records[:num_examples]
    examples: list[Example] = []
    truncated = 0
    for index, (at, rec) in enumerate(used):
        if fmt in CHAT_FORMATS:
            ids, labels = _tokenize_chat(rec, fmt, tokenizer, template, chat_targets, at)
        else:
            ids, labels = _tokenize(rec, fmt, tokenizer, at)
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"{at}: token id {bad} is outside the model's vocabulary (size {vocab_size})")
        badl = next((t for t in labels if t != IGNORE_INDEX and not 0 <= t < vocab_size), None)
        if badl is not None:
            raise ValueError(f"{at}: label {badl} is neither -100 nor a token id below {vocab_size}")
        if not any(y != IGNORE_INDEX for y in labels[1:]):
            raise ValueError(f"{at}: no target tokens (labels after the first position are all -100, or it is one token)")
        if len(ids) > max_length:
            if overlength == "refuse":
                raise ValueError(f"{at}: {len(ids)} tokens, more than max_length={max_length} (overlength: refuse)")
            ids, labels = ids[:max_length], labels[:max_length]
            truncated += 1
            if not any(y != IGNORE_INDEX for y in labels[1:]):
                raise ValueError(
                    f"{at}: no target tokens within max_length={max_length} (the prompt alone is longer); "
                    f"raise max_length or drop the record"
                )
        examples.append(Example(index=index, input_ids=tuple(ids), labels=tuple(labels)))
    return CalibrationData(examples=tuple(examples), format=fmt, sha256=sha, num_records=len(records),
                           truncated=truncated, tokenizer_sha256=tokenizer_sha, chat_template_sha256=template_sha,
                           container=container)


# --- containers ------------------------------------------------------------------------

def _container(url: str) -> str:
    name = url.rsplit("/", 1)[-1].lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".gz"):
        return "jsonl.gz"
    return "jsonl"


def _file_sha256(storage: Storage, url: str) -> str:
    h = hashlib.sha256()
    with storage.open_read(url) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _parse_line(line: str, at: str) -> dict[str, Any]:
    if not line.strip():
        raise ValueError(f"{at}: empty line")
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{at}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{at}: expected a JSON object, got {type(rec).__name__}")
    return rec


def _jsonl_records(raw: bytes, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data {where}: not UTF-8 text (byte {e.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    for n, line in enumerate(lines, start=1):
        at = f"data {where} line {n}"
        yield at, _parse_line(line, at)


def _gzip_jsonl_records(storage: Storage, url: str, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with storage.open_read(url) as f, gzip.GzipFile(fileobj=f, mode="rb") as gz:
        n = 0
        while True:
            try:
                raw = gz.readline()
            except (OSError, EOFError, zlib.error) as e:
                raise ValueError(f"data {where}: not valid gzip data after line {n} ({e})") from None
            if not raw:
                return
            n += 1
            at = f"data {where} line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{at}: not UTF-8 text (byte {e.start} of the line)") from None
            if line.endswith("\n"):
                line = line[:-1]
            yield at, _parse_line(line, at)


def _parquet_records(storage: Storage, url: str, where: str,
                     keys: dict[str, str]) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with storage.open_read(url) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"data {where}: not a parquet file ({e})") from None
        present = set(pf.schema_arrow.names)
        wanted = [keys["prompt"], keys["response"], keys["messages"], "text", "input_ids", "labels"]
        columns = [c for c in dict.fromkeys(wanted) if c in present]
        if not columns:
            raise ValueError(
                f"data {where}: no column {', '.join(repr(c) for c in dict.fromkeys(wanted))} "
                f"(columns: {', '.join(sorted(present))}); set prompt_key / response_key / messages_key"
            )
        row = 0
        for g in range(pf.num_row_groups):  # one row group in memory at a time
            try:
                table = pf.read_row_group(g, columns=columns)
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"data {where}: cannot read row group {g} (rows from {row}) ({e})") from None
            for rec in table.to_pylist():
                yield f"data {where} row {row}", {k: v for k, v in rec.items() if v is not None}
                row += 1


# --- records ---------------------------------------------------------------------------

def _apply_keys(rec: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    if all(k == v for k, v in keys.items()):
        return rec
    out = {k: v for k, v in rec.items() if k not in keys}
    for canon, src in keys.items():
        if src in rec:
            out[canon] = rec[src]
    return out


def _record_format(rec: dict[str, Any], at: str) -> str:
    found = [name for name, keys in FORMATS.items() if any(k in rec for k in keys)]
    if len(found) != 1:
        if not found:
            raise ValueError(f'{at}: expected {{"prompt","response"}}, {{"messages"}}, {{"text"}} or '
                             f'{{"input_ids"}} keys, got {sorted(rec)}')
        raise ValueError(f"{at}: mixes record formats ({', '.join(_describe(f) for f in found)})")
    kind = found[0]
    if kind == "prompt_response":
        if isinstance(rec.get("prompt"), (list, tuple)):
            kind = "chat_prompt_response"
            _check_messages(rec["prompt"], "prompt", at)
        elif not isinstance(rec.get("prompt"), str):
            raise ValueError(f"{at}: 'prompt' must be a string or a list of chat messages")
        if not isinstance(rec.get("response"), str):
            raise ValueError(f"{at}: 'response' must be a string")
        if not rec["response"]:
            raise ValueError(f"{at}: empty 'response' (nothing to score)")
    elif kind == "messages":
        msgs = rec["messages"]
        _check_messages(msgs, "messages", at)
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{at}: 'messages' has no assistant turn (nothing to score)")
    elif kind == "text":
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise ValueError(f"{at}: 'text' must be a non-empty string")
    else:
        ids = rec["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"{at}: 'input_ids' must be a non-empty list of integers")
        labels = rec.get("labels")
        if labels is not None:
            if not isinstance(labels, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in labels):
                raise ValueError(f"{at}: 'labels' must be a list of integers")
            if len(labels) != len(ids):
                raise ValueError(f"{at}: 'labels' has {len(labels)} entries, 'input_ids' {len(ids)}")
    return kind


def _check_messages(msgs: Any, key: str, at: str) -> None:
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise ValueError(f"{at}: '{key}' must be a non-empty list of chat messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"{at}: '{key}'[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        for field in ("role", "content"):
            if not isinstance(m.get(field), str):
                raise ValueError(f"{at}: '{key}'[{i}].{field} must be a string")


def _tokenize(rec: dict[str, Any], fmt: str, tokenizer: Any, at: str) -> tuple[list[int], list[int]]:
    if fmt == "tokenized":
        ids = list(rec["input_ids"])
        labels = list(rec["labels"]) if rec.get("labels") is not None else list(ids)
        return ids, labels
    if fmt == "text":
        ids = tokenizer.encode(rec["text"], add_special_tokens=True).ids
        return ids, list(ids)
    prompt = tokenizer.encode(rec["prompt"], add_special_tokens=True).ids if rec["prompt"] else []
    response = tokenizer.encode(rec["response"], add_special_tokens=False).ids
    if not response:
        raise ValueError(f"{at}: the response tokenizes to nothing")
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def _render(tokenizer: Any, template: str, messages: list[dict[str, Any]], generation_prompt: bool, at: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja2 and the template's own raise_exception
        msg = " ".join(str(e).split())[:300]
        raise ValueError(f"{at}: the chat template fails on this record ({type(e).__name__}: {msg})") from None


def _tokenize_chat(rec: dict[str, Any], fmt: str, tokenizer: Any, template: str, chat_targets: str,
                   at: str) -> tuple[list[int], list[int]]:
    if fmt == "chat_prompt_response":
        messages = [*map(dict, rec["prompt"]), {"role": "assistant", "content": rec["response"]}]
        turns = [len(messages) - 1]
    else:
        messages = [dict(m) for m in rec["messages"]]
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        turns = assistant[-1:] if chat_targets == "last" else assistant
    messages = messages[: turns[-1] + 1]  # later turns change no target's log-probability
    text = _render(tokenizer, template, messages, False, at)
    spans = []
    for i in turns:
        # the generation prompt marks where the turn starts (an opening turn starts at 0)
        head = _render(tokenizer, template, messages[:i], True, at) if i else ""
        through = _render(tokenizer, template, messages[: i + 1], False, at)
        if not (text.startswith(through) and through.startswith(head)):
            raise ValueError(
                f"{at}: the chat template does not render assistant turn {i} as a continuation of the conversation "
                f"before it with the generation prompt, so its tokens cannot be located"
            )
        spans.append((len(head), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    # a token is a target if it overlaps a turn's span (as return_assistant_tokens_mask marks it)
    s = 0
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        while s < len(spans) and a >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if b > spans[s][0]:
            labels[t] = ids[t]
    if all(y == IGNORE_INDEX for y in labels):
        raise ValueError(f"{at}: the assistant turn tokenizes to nothing")
    return ids, labels


def _describe(fmt: str) -> str:
    if fmt == "chat_prompt_response":
        return '{"prompt": [messages],"response"}'
    return "{" + ",".join(f'"{k}"' for k in FORMATS[fmt]) + "}"
