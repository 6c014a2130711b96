"""The only module that touches paths and URLs.

Local paths (``/x``, ``./x``, ``file:///x``) use ``os`` directly (pread, atomic rename);
anything else goes through fsspec, imported lazily, with range reads
(``cat_file(path, start, end)``) and streamed writes that become visible only when
complete (local: temp file + ``os.replace``; object stores: a (multipart) upload that
is completed on commit and aborted on error).

``Storage`` is a small picklable object carrying the user's ``storage_options``; it is
shipped inside each task so workers open their own filesystem clients.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, BinaryIO

# fsspec protocols whose files honour autocommit=False (commit/discard), so an upload
# is invisible until committed; others get a temporary name and a move
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az", "oss"})
READ_CONCURRENCY = 16
"""Default most range requests one task keeps in flight (``read_many``)."""
READ_PART_BYTES = 8 * 2**20
"""Remote ranges are fetched in parts of at most this size, concurrently."""


@contextmanager
def naming(url: str) -> Iterator[None]:
    """Put the URL into an ``OSError`` raised by a remote filesystem, keeping its type.

    Clients retry transient failures themselves; what escapes has exhausted them, and the
    user must learn which object failed (botocore's messages name only the operation).
    """
    try:
        yield
    except OSError as e:
        where = display_url(url)
        if where in str(e):
            raise
        try:
            named = type(e)(e.errno, f"{where}: {e.strerror}") if e.errno is not None else type(e)(f"{where}: {e}")
        except Exception:  # noqa: BLE001 - an OSError subclass with another signature
            raise e from None
        raise named from e
    except Exception as e:
        # botocore refuses a request before sending it (a bucket name it cannot take, say);
        # its reason sits on the lines after "Parameter validation failed:"
        if type(e).__name__ != "ParamValidationError":
            raise
        reason = "; ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip()) or str(e)
        raise ValueError(f"{display_url(url)}: {reason}") from None


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def join(url: str, *parts: str) -> str:
    """Join a base URL and relative names, refusing names that escape the base.

    Args:
        url: a directory URL or path.
        *parts: relative names (e.g. a shard file name from an index).

    Returns:
        The joined URL.

    Raises:
        ValueError: if a part is absolute, empty, or contains ``..`` or a backslash.
    """
    for part in parts:
        segments = part.split("/")
        if (
            not part
            or part.startswith("/")
            or "\\" in part
            or "\x00" in part
            or any(s in ("", ".", "..") for s in segments)
        ):
            raise ValueError(f"unsafe relative name {part!r} under {url}")
    if is_local(url):
        return os.path.join(url, *parts)
    return posixpath.join(url.rstrip("/"), *parts)


_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def display_url(url: str) -> str:
    """The URL as shown in messages: without any ``user:password@`` part."""
    return redact(url)


def redact(text: str) -> str:
    """``text`` with the userinfo of every URL in it removed (messages, events, manifests)."""
    return _USERINFO.sub(r"\1", text)


def redact_obj(obj: Any) -> Any:
    """A JSON-like value with every string in it redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, Mapping):
        return {redact(str(k)): redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


def check_no_userinfo(url: str, where: str) -> None:
    """Refuse a URL that carries credentials (``s3://KEY:SECRET@bucket``, ``http://u:p@host``).

    Credentials come from the environment or the storage's own config; a URL is shown in
    logs and recorded in manifests, so one inside it would leak.

    Raises:
        ValueError: naming ``where`` and the redacted URL.
    """
    if _USERINFO.search(url):
        raise ValueError(
            f"{where}: {redact(url)} carries credentials in the URL; credentials come from the environment "
            f"(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or the storage's own config, never a URL"
        )


_PROTOCOL_ALIASES = {"s3a": "s3", "gcs": "gs", "az": "abfs", "file": ""}


def _location(url: str) -> tuple[str, tuple[str, ...]]:
    """(protocol, path segments): local paths resolved (symlinks included), remote ones as given."""
    if is_local(url):
        return "", tuple(s for s in os.path.realpath(_local_path(url)).split(os.sep) if s)
    protocol, rest = url.split("://", 1)
    rest = rest.split("@", 1)[-1] if "@" in rest.split("/", 1)[0] else rest
    return _PROTOCOL_ALIASES.get(protocol, protocol), tuple(s for s in rest.split("/") if s not in ("", "."))


def relation(a: str, b: str) -> str | None:
    """How location ``a`` stands to ``b``: ``"is"``, ``"contains"``, ``"lies inside"``, or None.

    Local paths compare after ``realpath``; object-store URLs by protocol, bucket and key
    segments (``s3://b/x`` contains ``s3://b/x/y`` but not ``s3://b/xy``).
    """
    (pa, sa), (pb, sb) = _location(a), _location(b)
    if pa != pb:
        return None
    if sa == sb:
        return "is"
    if sb[: len(sa)] == sa:
        return "contains"
    if sa[: len(sb)] == sb:
        return "lies inside"
    return None


def protocol(url: str) -> str:
    """``"file"`` for local paths, else the URL's scheme."""
    return "file" if is_local(url) else url.split("://", 1)[0]


def bucket_of(url: str) -> str | None:
    """The bucket (container) of an object-store URL; None for other URLs."""
    if protocol(url) not in OBJECT_STORES:
        return None
    return url.split("://", 1)[1].split("/", 1)[0]


class Storage:
    """Reads and writes URLs with one set of fsspec ``storage_options``.

    Args:
        options: passed to ``fsspec.filesystem(protocol, **options)`` for remote URLs.
    """

    def __init__(self, options: Mapping[str, Any] | None = None):
        self.options: dict[str, Any] = dict(options or {})
        self._fs: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.options = state["options"]
        self._fs = {}

    def _remote(self, url: str) -> tuple[Any, str]:
        import fsspec  # lazy: local runs never import it

        protocol = url.split("://", 1)[0]
        fs = self._fs.get(protocol)
        if fs is None:
            fs = fsspec.filesystem(protocol, **self.options)
            self._fs[protocol] = fs
        return fs, fs._strip_protocol(url)

    # --- reading ---------------------------------------------------------------
    def exists(self, url: str) -> bool:
        """Whether a file exists at ``url``."""
        if is_local(url):
            return os.path.isfile(_local_path(url))
        fs, path = self._remote(url)
        with naming(url):
            return fs.isfile(path)

    def isdir(self, url: str) -> bool:
        """Whether ``url`` is a directory (or a prefix holding objects)."""
        if is_local(url):
            return os.path.isdir(_local_path(url))
        fs, path = self._remote(url)
        with naming(url):
            return fs.isdir(path)

    def size(self, url: str) -> int:
        """Size in bytes of the file at ``url``."""
        if is_local(url):
            return os.path.getsize(_local_path(url))
        fs, path = self._remote(url)
        with naming(url):
            return int(fs.size(path))

    def listdir(self, url: str, *, fresh: bool = False) -> list[str]:
        """Names (not URLs) of the entries directly under ``url``; [] if it is absent.

        ``fresh`` skips fsspec's listing cache (for what other processes write, e.g. leases).
        """
        if is_local(url):
            path = _local_path(url)
            return sorted(os.listdir(path)) if os.path.isdir(path) else []
        fs, path = self._remote(url)
        with naming(url):
            if fresh:
                fs.invalidate_cache(path)
            if not fs.isdir(path):
                return []
            return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))

    def check_bucket(self, url: str) -> None:
        """Raise ``ValueError`` if ``url`` lies in an object-store bucket that does not exist.

        sar-dist never creates buckets (their region, policy and lifecycle are the owner's
        choice), so a missing one is bad input, found at planning.
        """
        bucket = bucket_of(url)
        if bucket is None:
            return
        fs, _ = self._remote(url)
        with naming(url):
            found = fs.exists(bucket)
        if not found:
            raise ValueError(f"{display_url(url)}: bucket '{bucket}' does not exist (sar-dist never creates buckets)")

    def create_exclusive(self, url: str, data: bytes) -> bool:
        """Write a small file only if nothing is at ``url`` yet, atomically; False if something is.

        Local: a complete temporary file hard-linked to the name (``link`` fails if the name
        exists). Object stores: a PUT with ``If-None-Match: *``.
        """
        if is_local(url):
            try:
                with _staged(_local_path(url), os.link) as f:  # link: fails if the name exists
                    f.write(data)
            except FileExistsError:
                return False
            return True
        fs, path = self._remote(url)
        try:
            with naming(url):
                fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def read_range(self, url: str, start: int, end: int) -> bytearray:
        """Bytes ``[start, end)`` of a file, with one request (remote) or pread (local).

        Raises:
            EOFError: if the file is shorter than ``end``.
        """
        length = end - start
        buf = bytearray(length)
        if length == 0:
            return buf
        if is_local(url):
            with open(_local_path(url), "rb", buffering=0) as f:
                self._readinto_at(f, memoryview(buf), start)
            return buf
        buf[:] = self._fetch(url, start, end)
        return buf

    def read_into(self, url: str, start: int, out: memoryview) -> None:
        """Fill ``out`` with the file's bytes from ``start`` (no intermediate copy locally)."""
        if is_local(url):
            with open(_local_path(url), "rb", buffering=0) as f:
                self._readinto_at(f, out, start)
            return
        out[:] = self._fetch(url, start, start + len(out))

    def read_many(self, reads: Sequence[tuple[str, int, memoryview]], *, concurrency: int = READ_CONCURRENCY) -> None:
        """Fill every buffer with its file's bytes from its offset, with requests in flight together.

        Remote ranges are split into parts of at most ``READ_PART_BYTES`` and fetched with up to
        ``concurrency`` requests in flight (one object-store stream is latency-bound; parallel
        ranged GETs are how S3 clients reach the link's bandwidth). Parts are fetched in waves of
        ``concurrency`` and copied straight into the buffers, so besides the buffers at most
        ``concurrency * READ_PART_BYTES`` bytes are held. ``concurrency=1`` is one request per
        range, in order. Local files are read in order with ``pread`` (no gain from threads on
        the page cache, and no copy).

        Args:
            reads: ``(url, offset, buffer)`` triples.
            concurrency: most requests in flight.

        Raises:
            OSError: a request failed after the client's own retries (the message names the URL).
            EOFError: a file is shorter than a requested range.
        """
        check_read_concurrency(concurrency)
        by_protocol: dict[str, list[tuple[str, int, memoryview]]] = {}
        for url, start, out in reads:
            if len(out) == 0:
                continue
            if is_local(url):
                self.read_into(url, start, out)
                continue
            step = len(out) if concurrency == 1 else READ_PART_BYTES
            parts = by_protocol.setdefault(url.split("://", 1)[0], [])
            parts.extend((url, start + o, out[o : o + step]) for o in range(0, len(out), step))
        for parts in by_protocol.values():
            self._fetch_parts(parts, concurrency)

    def _fetch_parts(self, parts: list[tuple[str, int, memoryview]], concurrency: int) -> None:
        """Fetch parts of one filesystem into their buffers, ``concurrency`` at a time."""
        fs, _ = self._remote(parts[0][0])
        for w in range(0, len(parts), concurrency):
            wave = parts[w : w + concurrency]
            if len(wave) == 1:
                url, start, out = wave[0]
                out[:] = self._fetch(url, start, start + len(out))
                continue
            paths = [self._remote(url)[1] for url, _, _ in wave]
            extra = {"batch_size": concurrency} if getattr(fs, "async_impl", False) else {}
            got = fs.cat_ranges(paths, [s for _, s, _ in wave], [s + len(o) for _, s, o in wave],
                                on_error="return", **extra)
            for (url, start, out), data in zip(wave, got, strict=True):
                if isinstance(data, BaseException):
                    with naming(url):
                        raise data
                self._check_length(url, start, start + len(out), data)
                out[:] = data
            del got

    def _fetch(self, url: str, start: int, end: int) -> bytes:
        """One remote range request."""
        fs, path = self._remote(url)
        with naming(url):
            data = fs.cat_file(path, start=start, end=end)
        self._check_length(url, start, end, data)
        return data

    @staticmethod
    def _check_length(url: str, start: int, end: int, data: bytes) -> None:
        if len(data) != end - start:
            raise EOFError(f"{display_url(url)}: wanted bytes [{start}, {end}), got {len(data)}")

    @staticmethod
    def _readinto_at(f: BinaryIO, out: memoryview, start: int) -> None:
        fd = f.fileno()
        done = 0
        while done < len(out):
            n = os.preadv(fd, [out[done:]], start + done)
            if n == 0:
                raise EOFError(
                    f"{f.name}: wanted {len(out)} bytes at offset {start}, file ends early"
                )
            done += n

    @contextmanager
    def open_read(self, url: str) -> Iterator[BinaryIO]:
        """A file object to stream a (large) input: a data file read line by line or by row group."""
        if is_local(url):
            with open(_local_path(url), "rb") as f:
                yield f
            return
        fs, path = self._remote(url)
        with naming(url):
            f = fs.open(path, "rb")
        with f:
            yield f

    def read_bytes(self, url: str) -> bytes:
        """A whole (small) file: configs, index JSON, manifests."""
        if is_local(url):
            with open(_local_path(url), "rb") as f:
                return f.read()
        fs, path = self._remote(url)
        with naming(url):
            return fs.cat_file(path)

    # --- writing ---------------------------------------------------------------
    def write_bytes(self, url: str, data: bytes) -> None:
        """Write a small file so that it appears complete or not at all."""
        with self.open_write(url) as f:
            f.write(data)

    @contextmanager
    def open_write(self, url: str) -> Iterator[BinaryIO]:
        """Stream a file that becomes visible at ``url`` only if the block exits cleanly.

        Local: a temp file in the same directory, fsynced, then ``os.replace``.
        Remote: fsspec's buffered writer (a multipart upload on object stores), committed
        on close and discarded (multipart aborted) on error.
        """
        if is_local(url):
            with _staged(_local_path(url), os.replace) as f:
                yield f
            return
        fs, path = self._remote(url)
        parent = posixpath.dirname(path)
        if protocol(url) in OBJECT_STORES:
            # no makedirs: object stores have no directories, and s3fs's makedirs creates a
            # missing bucket, which is the owner's to create
            # parts upload as we go; the object appears on commit() (multipart
            # complete) and discard() aborts the upload
            with naming(url):
                f = fs.open(path, "wb", autocommit=False)
            try:
                yield f
                with naming(url):
                    f.close()
            except BaseException:
                f.discard()
                raise
            with naming(url):
                f.commit()
            return
        # filesystems without transactional files (memory://, ...): write a hidden
        # temporary name, then move it into place
        if parent:
            fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{unique_suffix()}.partial")
        try:
            with fs.open(tmp, "wb") as g:
                yield g
            fs.mv(tmp, path)
        except BaseException:
            if fs.exists(tmp):
                fs.rm_file(tmp)
            raise

    def remove(self, url: str) -> None:
        """Delete a file if it exists."""
        if is_local(url):
            try:
                os.unlink(_local_path(url))
            except FileNotFoundError:
                pass
            return
        fs, path = self._remote(url)
        with naming(url):
            if fs.exists(path):
                fs.rm_file(path)

    def remove_empty_dir(self, url: str) -> None:
        """Remove a local directory if it is empty (object stores have none to remove)."""
        if is_local(url):
            with contextlib.suppress(OSError):
                os.rmdir(_local_path(url))

    def remove_tree(self, url: str) -> None:
        """Delete a directory and everything under it, if present."""
        if is_local(url):
            import shutil

            shutil.rmtree(_local_path(url), ignore_errors=True)
            return
        fs, path = self._remote(url)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def remove_partials(self, directory: str, names: Iterable[str]) -> list[str]:
        """Delete temporary files that writers of ``names`` under ``directory`` left behind.

        ``open_write`` removes its temporary file when its block fails, but a writer killed
        with SIGKILL (or lost with its node) cannot; a commit calls this once no writer of
        the job is left. Object stores have no such files: an abandoned multipart upload
        is invisible and is reclaimed by the bucket's lifecycle rule
        (``AbortIncompleteMultipartUpload``).

        Returns:
            The names removed.
        """
        prefixes = tuple(f".{n}." for n in names)
        removed = [e for e in self.listdir(directory) if e.startswith(prefixes) and e.endswith(".partial")]
        for entry in removed:
            self.remove(join(directory, entry))
        return removed

    def makedirs(self, url: str) -> None:
        """Create a directory (a no-op on object stores, which have none and whose
        ``makedirs`` would create a missing bucket)."""
        if is_local(url):
            os.makedirs(_local_path(url), exist_ok=True)
            return
        if protocol(url) in OBJECT_STORES:
            return
        fs, path = self._remote(url)
        fs.makedirs(path, exist_ok=True)


@contextmanager
def _staged(path: str, publish: Callable[[str, str], None]) -> Iterator[BinaryIO]:
    """A local file written under a temporary name beside ``path``, fsynced, then put in place
    with ``publish(tmp, path)`` (``os.replace``, or ``os.link`` to refuse an existing name); the
    temporary file never outlives the block."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_read_concurrency(concurrency: int) -> None:
    """Raise ``ValueError`` unless at least one request may be in flight."""
    if concurrency < 1:
        raise ValueError(f"read concurrency must be >= 1, got {concurrency}")


def unique_suffix() -> str:
    """A short random suffix for temporary names."""
    return uuid.uuid4().hex[:12]
