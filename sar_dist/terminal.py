"""Live progress bars for a person at a terminal (tqdm), fed by the same events as ``--json``.

One bar per stage and model: the Fisher stage counts target tokens (with examples in the
postfix), the merge counts bytes written (with tensors in the postfix); tqdm shows the rate and
the ETA. The CLI uses this only when stderr is a terminal and ``--json`` is off; otherwise it
logs one line per event, as before.
"""

from __future__ import annotations

import threading
from typing import Any, TextIO


class ProgressBars:
    """Bars keyed by (stage, model), created on a stage's ``start`` event, closed when it ends."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._bars: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> bool:
        """Show ``event``; returns False for an event a bar does not show (the caller logs it)."""
        from tqdm import tqdm

        kind, stage, model = event.get("event"), event.get("stage") or _stage_of(event), event.get("model") or ""
        key = (stage, model)
        label = f"{stage} {model}".strip()
        with self._lock:
            bar = self._bars.get(key)
            if stage == "fisher" and kind == "start":
                self._bars[key] = tqdm(total=event["target_tokens_total"], desc=label, unit="tok", file=self._stream,
                                       dynamic_ncols=True, leave=True)
                return False  # the start line is logged too: groups, ranks, output
            if stage == "merge" and kind == "start":
                bar = self._bars[key] = tqdm(total=event["bytes_total"], desc=label, unit="B", unit_scale=True,
                                             unit_divisor=1000, file=self._stream, dynamic_ncols=True, leave=True)
                bar.update(event["bytes_done"])  # resumed shards
                bar.set_postfix_str(f"tensors {event['tensors_done']}/{event['tensors_total']}")
                return False
            if bar is None:
                return False
            if stage == "fisher" and kind == "progress":
                bar.update(event["target_tokens_done"] - bar.n)
                bar.set_postfix_str(f"examples {event['examples_done']}/{event['examples_total']}")
                return True
            if stage == "merge" and kind in ("tensor_done", "shard_done"):
                bar.update(event["bytes_done"] - bar.n)
                bar.set_postfix_str(f"tensors {event['tensors_done']}/{event['tensors_total']}")
                return True
            if kind in ("committed", "already_complete"):
                if stage == "merge":
                    bar.update(event.get("bytes_done", bar.n) - bar.n)
                bar.close()
                del self._bars[key]
            return False

    def write(self, line: str) -> None:
        """A log line that does not break the bars."""
        from tqdm import tqdm

        with self._lock:
            tqdm.write(line, file=self._stream)

    def close(self) -> None:
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()


def _stage_of(event: dict[str, Any]) -> str:
    """The stage of an event from a single-stage command (``merge`` or ``fisher``)."""
    return "fisher" if "target_tokens_total" in event or "parts_total" in event else "merge"
