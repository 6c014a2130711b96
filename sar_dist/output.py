"""What a run may do to its output: never write where it reads, never touch what it did not
write, and never share the output with a second run.

Every stage (merge, fisher, analyze) goes through the same three checks before its first
write:

- ``check_disjoint``: the output is not, does not contain and does not lie inside any input
  (local paths after ``realpath``, so symlinks count; object stores by bucket and key prefix).
- ``check_ownership``: a non-empty output must hold only what sar-dist wrote (names listed by
  an earlier run's manifest or its claims file), unless ``--force``; even with ``--force`` a
  name this run would write that is taken by a file sar-dist did not write is refused.
- ``Lease``: one run at a time per output, on local disk and on object storage, which a
  crashed run does not hold forever.

Then ``write_claims`` records the names this run is about to write in
``.sar_dist/claims.json``, before it writes any of them, so a rerun (or a ``--force`` run)
knows they are sar-dist's to replace.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from sar_dist.checkpoint.index import read_json
from sar_dist.storage import Storage, display_url, is_local, join, relation

STATE_DIR = ".sar_dist"
"""Run state under an output: receipts, claims and leases; removed by name on commit."""
CLAIMS_NAME = "claims.json"
LEASE_TTL_S = 60.0
"""A lease whose holder runs on another host is stale once its heartbeat is this old."""
HEARTBEAT_S = 10.0
_LEASE = re.compile(r"lease-(\d{6})\.json")


class LeaseHeld(ValueError):
    """Another live run holds the output's lease (bad input: exit 2, nothing written)."""


# --- inputs -----------------------------------------------------------------------------
def check_disjoint(output: str, inputs: Iterable[tuple[str, str]]) -> None:
    """Refuse an output that is, contains or lies inside an input.

    Args:
        output: the output directory URL.
        inputs: ``(role, url)`` pairs, e.g. ``("base_model", url)`` or ``("models[0] shard", file)``.

    Raises:
        ValueError: naming the input.
    """
    for role, url in inputs:
        how = relation(output, url)
        if how is not None:
            shown = display_url(url)
            if is_local(url) and os.path.realpath(url) != os.path.abspath(url):
                shown += f" (a link to {os.path.realpath(url)})"
            raise ValueError(
                f"output {display_url(output)} {how} {role} {shown}: a run never writes where it reads; "
                f"choose another output"
            )


# --- what is ours -----------------------------------------------------------------------
def read_claims(storage: Storage, output: str) -> set[str]:
    """Names an earlier run recorded it was going to write (empty if none)."""
    claims = read_json(storage, join(output, STATE_DIR, CLAIMS_NAME), strict=False)
    if claims is None or not isinstance(claims.get("files"), list):
        return set()
    return {f for f in claims["files"] if isinstance(f, str)}


def write_claims(storage: Storage, output: str, names: Iterable[str], known: Iterable[str] = ()) -> None:
    """Record the names this run will write, with those earlier runs claimed (before any of them)."""
    files = sorted(set(names) | set(known) | read_claims(storage, output))
    storage.write_bytes(join(output, STATE_DIR, CLAIMS_NAME), json.dumps({"files": files}, indent=1).encode())


def _is_partial_of(entry: str, names: set[str]) -> bool:
    """``.NAME.<random>.partial``: a temporary file of a writer of ``NAME`` (storage.open_write)."""
    if not (entry.startswith(".") and entry.endswith(".partial")):
        return False
    return entry[1:].rsplit(".", 2)[0] in names


def check_ownership(storage: Storage, output: str, planned: Iterable[str], ours: Iterable[str], *,
                    force: bool) -> None:
    """Refuse to write into files or directories sar-dist did not write.

    Args:
        storage: output storage.
        output: the output directory URL.
        planned: top-level names this run will write.
        ours: top-level names earlier sar-dist runs wrote here (their manifest's files, their claims).
        force: allow writing beside files sar-dist did not write (never over them).

    Raises:
        ValueError: the output holds files sar-dist did not write and ``force`` is off, or a
            planned name is one of them.
    """
    if storage.exists(output):
        raise ValueError(f"output {display_url(output)}: is a file; give a directory")
    planned, mine = set(planned), set(ours) | read_claims(storage, output)
    entries = [e for e in storage.listdir(output) if e != STATE_DIR]
    foreign = [e for e in entries if e not in mine and not _is_partial_of(e, planned | mine)]
    if not foreign:
        return
    if not force:
        shown = ", ".join(repr(e) for e in sorted(foreign)[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(
            f"output {display_url(output)}: not empty and not written by sar-dist ({shown}); choose an empty "
            f"or new output, or pass --force to write beside those files (they are never touched)"
        )
    clash = sorted(set(foreign) & planned)
    if clash:
        raise ValueError(
            f"output {display_url(output)}: '{clash[0]}' is there and was not written by sar-dist; it is "
            f"never overwritten, even with --force; choose another output"
        )


# --- one run at a time ------------------------------------------------------------------
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> list[str]:
    """Fields of ``/proc/PID/stat`` after the command name ([] where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' if unknown): tells a reused pid apart."""
    fields = _proc_stat(pid)
    return fields[19] if len(fields) > 19 else ""


def _alive_here(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    fields = _proc_stat(pid)
    if fields and fields[0] in ("Z", "X"):
        return False  # killed, not yet reaped by its parent
    return not start or not fields or fields[19] == start


class Lease:
    """Exclusive, expiring ownership of an output for one run.

    The lease is the newest ``.sar_dist/lease-NNNNNN.json``. Taking it creates the next
    number exclusively (``Storage.create_exclusive``: a hard link locally, an
    ``If-None-Match`` PUT on object stores), so of two runs that both find the newest lease
    stale, exactly one wins. The holder rewrites its file every ``HEARTBEAT_S``. A lease is
    stale when its holder ran on this host (same boot) and the process is gone, or, for
    another host, when its heartbeat is older than ``LEASE_TTL_S``: a killed run is resumed
    at once on its own machine, and after a minute from any other.

    Args:
        storage: output storage.
        output: the output directory URL.
        what: what the run does, shown to a refused second run (e.g. ``"merge"``).
    """

    def __init__(self, storage: Storage, output: str, what: str):
        self.storage, self.output, self.what = storage, output, what
        self.url: str | None = None
        self._number = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.lost: str | None = None
        self._holder = {
            "what": what, "host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "process_start": _process_start(os.getpid()), "started": time.time(),
        }

    def _leases(self) -> list[int]:
        names = self.storage.listdir(join(self.output, STATE_DIR), fresh=True)
        return sorted(int(m.group(1)) for n in names if (m := _LEASE.fullmatch(n)))

    def _url(self, number: int) -> str:
        return join(self.output, STATE_DIR, f"lease-{number:06d}.json")

    def _body(self) -> bytes:
        return json.dumps({**self._holder, "heartbeat": time.time()}).encode()

    def _stale(self, lease: Any) -> bool:
        if not isinstance(lease, dict):
            return True  # unreadable: no live holder wrote it (writes are atomic)
        same_machine = lease.get("host") == self._holder["host"] and lease.get("boot_id") == self._holder["boot_id"]
        if same_machine and isinstance(lease.get("pid"), int):
            return not _alive_here(lease["pid"], str(lease.get("process_start", "")))
        beat = lease.get("heartbeat")
        return not isinstance(beat, (int, float)) or time.time() - beat > LEASE_TTL_S

    @staticmethod
    def describe(lease: dict[str, Any]) -> str:
        age = time.time() - float(lease.get("heartbeat", 0))
        return (f"a {lease.get('what', 'run')} by pid {lease.get('pid')} on {lease.get('host')}, "
                f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(lease.get('started', 0))))}, "
                f"last heartbeat {age:.0f}s ago")

    def acquire(self) -> None:
        """Take the lease and start the heartbeat.

        Raises:
            LeaseHeld: a live run holds it (the message names the holder).
        """
        for _ in range(5):
            numbers = self._leases()
            newest = numbers[-1] if numbers else 0
            if newest:
                lease = read_json(self.storage, self._url(newest), strict=False)
                if not self._stale(lease):
                    raise LeaseHeld(
                        f"output {display_url(self.output)}: in use by {self.describe(lease)}; wait for it to "
                        f"finish or choose another output (a killed run's lease expires: at once on its own host, "
                        f"after {LEASE_TTL_S:.0f}s from another)"
                    )
            if self.storage.create_exclusive(self._url(newest + 1), self._body()):
                self._number, self.url = newest + 1, self._url(newest + 1)
                for old in numbers:  # stale, superseded: ours to tidy
                    self.storage.remove(self._url(old))
                self._thread = threading.Thread(target=self._beat, name="sar-dist-lease", daemon=True)
                self._thread.start()
                return
            # another run took newest + 1 between our look and our create: look again
        raise LeaseHeld(f"output {display_url(self.output)}: the lease changed hands repeatedly; another run is "
                        f"starting on it")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self.check()
                    self.storage.write_bytes(self.url, self._body())
            except Exception as e:  # noqa: BLE001 - a failed beat is retried; a lost lease is reported at commit
                if self.lost is None and isinstance(e, LeaseHeld):
                    self.lost = str(e)

    def check(self) -> None:
        """Raise ``LeaseHeld`` if another run has taken the lease over (ours went stale)."""
        if self.lost is not None:
            raise LeaseHeld(self.lost)
        newer = [n for n in self._leases() if n > self._number]
        if newer:
            lease = read_json(self.storage, self._url(newer[-1]), strict=False)
            holder = self.describe(lease) if isinstance(lease, dict) else "another run"
            self.lost = (f"output {display_url(self.output)}: this run's lease expired and was taken by {holder}; "
                         f"nothing was committed")
            raise LeaseHeld(self.lost)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file (idempotent)."""
        self._stop.set()
        with self._lock:
            if self.url is not None:
                if self.lost is None:
                    self.storage.remove(self.url)
                self.url = None
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.storage.remove_empty_dir(join(self.output, STATE_DIR))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_state(storage: Storage, output: str, names: Sequence[str]) -> None:
    """Remove this run's own state files (receipts, claims) by name; never the whole directory."""
    for name in [*names, CLAIMS_NAME]:
        storage.remove(join(output, STATE_DIR, name))
