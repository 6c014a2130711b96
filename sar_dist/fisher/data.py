"""Calibration data: JSONL records -> tokenized ``Example``s, validated line by line.

Three record formats (one per file):

* ``{"prompt": str, "response": str}``: targets are the response tokens. The prompt is
  tokenized with the tokenizer's special tokens (e.g. BOS), the response without, and the
  two are concatenated; no chat template is applied.
* ``{"text": str}``: targets are every token after the first.
* ``{"input_ids": [int], "labels": [int]?}``: already tokenized; ``labels`` aligned with
  ``input_ids`` (-100 = not a target; default: ``input_ids``), as Hugging Face's models take.

Other keys in a record are ignored. Every problem is reported with its line number before
any worker starts. Records longer than ``max_length`` are truncated (counted) or refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sar_dist.fisher.types import IGNORE_INDEX, Example
from sar_dist.storage import Storage, display_url, join

FORMATS = {
    "prompt_response": ("prompt", "response"),
    "text": ("text",),
    "tokenized": ("input_ids",),
}


@dataclass(frozen=True, kw_only=True)
class CalibrationData:
    """Examples ready for the workers, and what ``fisher.json`` records about them.

    Attributes:
        examples: the examples used, in file order.
        format: ``prompt_response``, ``text`` or ``tokenized``.
        sha256: of the data file's bytes.
        num_records: records in the file.
        truncated: examples cut to ``max_length``.
        tokenizer_sha256: of the tokenizer.json used (None for pre-tokenized data).
    """

    examples: tuple[Example, ...]
    format: str
    sha256: str
    num_records: int
    truncated: int
    tokenizer_sha256: str | None = None

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

    path = join(url, "tokenizer.json")
    if not storage.exists(path):
        raise ValueError(
            f"tokenizer {display_url(url)}: no tokenizer.json; text data needs one (set 'tokenizer:' to a "
            f"directory that has it, or give pre-tokenized {{\"input_ids\"}} records)"
        )
    raw = storage.read_bytes(path)
    try:
        return Tokenizer.from_str(raw.decode("utf-8")), hashlib.sha256(raw).hexdigest()
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own types
        raise ValueError(f"{display_url(path)}: cannot load the tokenizer ({e})") from None


def load_examples(
    storage: Storage,
    url: str,
    *,
    vocab_size: int,
    max_length: int,
    overlength: str = "truncate",
    num_examples: int | None = None,
    tokenizer_url: str | None = None,
) -> CalibrationData:
    """Read, validate and tokenize a JSONL calibration file.

    Args:
        storage: where to read.
        url: the JSONL file.
        vocab_size: token ids must be below it.
        max_length: most tokens per example.
        overlength: ``truncate`` or ``refuse``.
        num_examples: use the first this many records (all are validated).
        tokenizer_url: directory with ``tokenizer.json`` (needed unless pre-tokenized).

    Raises:
        ValueError: one line naming the file and line.
    """
    where = display_url(url)
    try:
        raw = storage.read_bytes(url)
    except FileNotFoundError:
        raise ValueError(f"data {where}: file not found") from None
    sha = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data {where}: not UTF-8 text (byte {e.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    if not lines:
        raise ValueError(f"data {where}: no records")

    records: list[tuple[int, dict[str, Any]]] = []
    fmt: str | None = None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"data {where} line {n}: empty line")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"data {where} line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"data {where} line {n}: expected a JSON object, got {type(rec).__name__}")
        kind = _record_format(rec, f"data {where} line {n}")
        if fmt is None:
            fmt = kind
        elif kind != fmt:
            raise ValueError(f"data {where} line {n}: a {_describe(kind)} record in a file of {_describe(fmt)} records")
        records.append((n, rec))
    assert fmt is not None

    tokenizer = tokenizer_sha = None
    if fmt != "tokenized":
        if not tokenizer_url:
            raise ValueError(f"data {where}: text records need a tokenizer")
        tokenizer, tokenizer_sha = load_tokenizer(storage, tokenizer_url)

    used = records if num_examples is None else records[:num_examples]
    examples: list[Example] = []
    truncated = 0
    for index, (n, rec) in enumerate(used):
        at = f"data {where} line {n}"
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
                           truncated=truncated, tokenizer_sha256=tokenizer_sha)


def _record_format(rec: dict[str, Any], at: str) -> str:
    found = [name for name, keys in FORMATS.items() if any(k in rec for k in keys)]
    if len(found) != 1:
        if not found:
            raise ValueError(f'{at}: expected {{"prompt","response"}}, {{"text"}} or {{"input_ids"}} keys, got {sorted(rec)}')
        raise ValueError(f"{at}: mixes record formats ({', '.join(_describe(f) for f in found)})")
    kind = found[0]
    if kind == "prompt_response":
        for key in ("prompt", "response"):
            if not isinstance(rec.get(key), str):
                raise ValueError(f"{at}: '{key}' must be a string")
        if not rec["response"]:
            raise ValueError(f"{at}: empty 'response' (nothing to score)")
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


def _describe(fmt: str) -> str:
    return "{" + ",".join(f'"{k}"' for k in FORMATS[fmt]) + "}"
