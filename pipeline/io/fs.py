"""One place that turns a URL (local path or ``s3://``) into an fsspec filesystem, and reads bytes safely.

S3 settings come from the environment (``AWS_*``, including ``AWS_ENDPOINT_URL`` for S3-compatible
stores); credentials are never copied into configs, logs or ``run.json``.

Reads never hang and never give up at the first hiccup: a local path that is not a regular file (a FIFO
would block forever, a device would stream forever) is refused before any byte is read; S3 connections and
reads have timeouts; and transient errors (timeouts, dropped connections, HTTP 5xx, S3 ``SlowDown``) are
retried with exponential backoff before a sample is failed.

Reads reach only what the config allows: :func:`check_protocol` refuses a protocol outside ``sources.protocols``
and, always, a chained URL (``zip://a::s3://b``) or ``memory://``, before any filesystem is made or request
sent; ``local://`` is a local path like ``file://`` (so the device guard applies to it too); and a read given
``max_bytes`` refuses a larger input from its size (``stat`` / ``fs.size``) before reading, then reads at most
``max_bytes + 1`` bytes.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import random
import re
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, TypeVar

import fsspec
from fsspec.core import url_to_fs

from pipeline.config import DEFAULT_PROTOCOLS, NEVER_PROTOCOLS, PROTOCOL_ALIASES

log = logging.getLogger(__name__)

T = TypeVar("T")

# S3 timeouts in seconds (botocore ``Config``), explicit and overridable by env; s3fs's built-in 5 s / 15 s
# are too tight for a busy S3-compatible store, and a run must not inherit a library's default silently.
S3_CONNECT_TIMEOUT_S = 10.0
S3_READ_TIMEOUT_S = 30.0
# read_range: tries per read, and the first backoff delay (doubled after each failure).
READ_ATTEMPTS = 4
READ_RETRY_BASE_S = 0.2


LOCAL_PREFIXES = ("file://", "local://")  # fsspec's two spellings of the local file system
_URL_PROTOCOL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith(LOCAL_PREFIXES)


def local_path(url: str) -> str:
    """The absolute path of a local URL (plain, ``file://`` or ``local://``)."""
    for prefix in LOCAL_PREFIXES:
        if url.startswith(prefix):
            url = url[len(prefix):]
            break
    return os.path.abspath(url)


def url_protocol(url: str) -> str:
    """The protocol of a URL as the allow-list names it: ``file`` for a local path (``local`` is an alias)."""
    m = _URL_PROTOCOL.match(url)
    if m is None:
        return "file"
    name = m.group(1).lower()
    return PROTOCOL_ALIASES.get(name, name)


def check_protocol(url: str, allowed: Sequence[str] | None = None) -> None:
    """Raise :class:`ProtocolRefusedError` unless ``url`` may be opened: never a chained URL or ``memory://``,
    and its protocol must be in ``allowed`` (default ``file``, ``s3``). Nothing is opened or requested."""
    if "::" in url:
        raise ProtocolRefusedError(f"chained URL refused (a URL with '::' is never opened): {url}")
    name = url_protocol(url)
    allowed = DEFAULT_PROTOCOLS if allowed is None else allowed
    if name in NEVER_PROTOCOLS or name not in allowed:
        raise ProtocolRefusedError(f"protocol {name!r} is not allowed (sources.protocols: {', '.join(allowed)}): "
                                   f"{url}")


def _env_seconds(name: str, default: float) -> float:
    return _seconds(name, os.environ.get(name, ""), default)


@functools.lru_cache(maxsize=32)
def _seconds(name: str, raw: str, default: float) -> float:
    """A positive number of seconds from an env value; a bad value warns once (cached) and keeps the default."""
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if value <= 0:
        log.warning("ignoring %s=%r (not a positive number of seconds); using %s", name, raw, default)
        return default
    return value


def storage_options(url: str) -> dict[str, Any]:
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {"config_kwargs": {
            "connect_timeout": _env_seconds("STYLEGEN_S3_CONNECT_TIMEOUT_S", S3_CONNECT_TIMEOUT_S),
            "read_timeout": _env_seconds("STYLEGEN_S3_READ_TIMEOUT_S", S3_READ_TIMEOUT_S),
        }}
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for a URL; local paths are made absolute. A chained URL is refused here
    whatever the caller (fsspec would otherwise open one protocol through another)."""
    if "::" in url:
        raise ProtocolRefusedError(f"chained URL refused (a URL with '::' is never opened): {url}")
    if not is_remote(url):
        url = local_path(url)
    return url_to_fs(url, **storage_options(url))


def join(base: str, *parts: str) -> str:
    """Join path parts for local paths and URLs alike."""
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL a path on ``fs`` can be reopened with through :func:`get_fs`."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("file", "local"):
        return path
    return f"{protocol}://{path}"


class RefusedInputError(OSError):
    """An input refused before any byte of it is read; the message says why. Never retried."""


class NotRegularFileError(RefusedInputError):
    """A local input that is a FIFO, socket, device or folder: reading it could block or never end."""


class ProtocolRefusedError(RefusedInputError):
    """A URL whose protocol is not allowed (``sources.protocols``), or a chained URL."""


class InputTooLargeError(RefusedInputError):
    """An input larger than the byte cap it is read under."""


def too_large(url: str, size: int, max_bytes: int, key: str = "decode.max_bytes") -> InputTooLargeError:
    return InputTooLargeError(f"too large: {size} bytes, more than {key}={max_bytes}: {url}")


def file_kind(mode: int) -> str:
    """``fifo``, ``socket``, ``directory``, ... for a ``st_mode``: names what a refused input is."""
    for test, kind in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "special file"


def _not_regular(path: str, mode: int) -> NotRegularFileError:
    return NotRegularFileError(f"not a regular file ({file_kind(mode)}): {path}")


def open_local(path: str) -> BinaryIO:
    """Open a local file for reading, refusing anything but a regular file (symlinks are followed).

    ``stat`` first, so devices are never opened; then ``O_NONBLOCK`` so that opening a FIFO swapped in
    meanwhile returns at once instead of waiting for a writer, and ``fstat`` refuses it before any read."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_input(url: str, *, max_bytes: int | None = None, cap_key: str = "decode.max_bytes") -> BinaryIO:
    """Open any URL for (seekable) reading; a local one through :func:`open_local`. With ``max_bytes``, a larger
    file is refused from its size (:class:`InputTooLargeError`) before a byte is read."""
    fs, path = get_fs(url)
    f = fs.open(path, "rb") if is_remote(url) else open_local(path)
    if max_bytes is not None:
        size = os.fstat(f.fileno()).st_size if not is_remote(url) else fs.size(path)
        if size is not None and size > max_bytes:
            f.close()
            raise too_large(url, size, max_bytes, cap_key)
    return f


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [TimeoutError, ConnectionError]
    try:
        from botocore import exceptions as boto

        types += [boto.ConnectionError, boto.ReadTimeoutError, boto.ConnectionClosedError]
    except ImportError:
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    return tuple(types)


_TRANSIENT_TYPES = _transient_types()
_NEVER_RETRIED = (FileNotFoundError, PermissionError, IsADirectoryError, RefusedInputError)
# An HTTP status in a message: aiohttp ("503, message=..."), botocore ("An error occurred (503)"), s3fs.
_TRANSIENT_TEXT = re.compile(r"\b(?:5\d\d|429)\b|SlowDown|InternalError|ServiceUnavailable|RequestTimeout|Throttl")


def is_transient(exc: BaseException) -> bool:
    """True for an error that a later try may not hit: a timeout, a dropped connection, HTTP 5xx or 429,
    S3 throttling. Missing files and denied access are answers, not hiccups: never transient."""
    seen = 0
    while exc is not None and seen < 5:  # s3fs and fsspec wrap the botocore/aiohttp error as the cause
        if isinstance(exc, _NEVER_RETRIED):
            return False
        status = getattr(exc, "status", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
        if isinstance(exc, _TRANSIENT_TYPES) or _TRANSIENT_TEXT.search(str(exc)):
            return True
        exc, seen = exc.__cause__, seen + 1
    return False


class StoreReadError(RuntimeError):
    """A read the store failed (network, credentials, access), as opposed to bytes that arrived and do not parse:
    the first is never evidence of damage. Not an ``OSError``, so no parser's ``except OSError`` takes it for
    a truncated file; the store's own error is its ``__cause__``."""


class StoreReads:
    """A file object whose every failing call raises :class:`StoreReadError`, so that a caller parsing it
    (pyarrow, tarfile) can tell "the store failed" from "the content is bad". Hand-written: fsspec and
    pyarrow raise both kinds of error alike."""

    _GUARDED = frozenset({"read", "readinto", "read1", "readline", "seek", "tell", "peek", "size"})

    def __init__(self, f: BinaryIO, path: str):
        self._f, self._path = f, path

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._f, name)
        if name not in self._GUARDED:
            return attr

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as exc:
                raise StoreReadError(f"{self._path}: {exc.__class__.__name__}: {exc}") from exc

        return guarded

    def __enter__(self) -> StoreReads:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()


def open_store_file(fs: fsspec.AbstractFileSystem, path: str) -> StoreReads:
    """``fs.open(path, "rb")`` behind :class:`StoreReads`; a missing file raises ``FileNotFoundError``, any other
    failure to open it :class:`StoreReadError`."""
    try:
        return StoreReads(fs.open(path, "rb"), path)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise StoreReadError(f"{path}: {exc.__class__.__name__}: {exc}") from exc


def retry_transient(fn: Callable[[], T], *, attempts: int = READ_ATTEMPTS, base_delay_s: float = READ_RETRY_BASE_S,
                    what: str = "") -> T:
    """``fn()``, tried up to ``attempts`` times while it fails with a transient error (:func:`is_transient`).

    The delay doubles after each failure, with jitter so that many workers throttled together do not
    retry in lockstep. The last error, or the first permanent one, is raised unchanged."""
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as exc:
            if attempt >= attempts or not is_transient(exc):
                raise
            delay = base_delay_s * 2 ** (attempt - 1) * random.uniform(0.75, 1.25)
            log.warning("transient error reading %s (try %d of %d), retrying in %.2fs: %s: %s",
                        what or "input", attempt, attempts, delay, exc.__class__.__name__, exc)
            time.sleep(delay)
            attempt += 1


def read_range(url: str, offset: int = 0, size: int = -1, *, max_bytes: int | None = None,
               cap_key: str = "decode.max_bytes") -> bytes:
    """Read a whole object, or ``size`` bytes at ``offset`` (a member inside a tar).

    A local path that is not a regular file raises :class:`NotRegularFileError` (never blocks); transient
    remote errors are retried (:func:`retry_transient`). With ``max_bytes``, an input larger than that is refused
    from its size (the member size, ``fstat`` or ``fs.size``) before it is read (:class:`InputTooLargeError`,
    naming ``cap_key``), and no more than ``max_bytes + 1`` bytes are ever read."""
    if max_bytes is not None and size > max_bytes:
        raise too_large(url, size, max_bytes, cap_key)
    if not is_remote(url):
        return retry_transient(lambda: _read_local(local_path(url), offset, size, max_bytes, cap_key), what=url)
    fs, path = get_fs(url)
    if size < 0 and max_bytes is not None:
        return retry_transient(lambda: _read_remote_capped(fs, path, url, max_bytes, cap_key), what=url)
    if size < 0:
        return retry_transient(lambda: fs.cat_file(path), what=url)
    return retry_transient(lambda: fs.cat_file(path, start=offset, end=offset + size), what=url)


def _read_remote_capped(fs: fsspec.AbstractFileSystem, path: str, url: str, max_bytes: int, cap_key: str) -> bytes:
    total = fs.size(path)
    if total is not None and total > max_bytes:
        raise too_large(url, total, max_bytes, cap_key)
    if not total:
        return fs.cat_file(path)  # an empty object: a ranged read of it is an error on S3
    data = fs.cat_file(path, start=0, end=min(total, max_bytes + 1))
    if len(data) > max_bytes:  # grew since its size was read
        raise too_large(url, len(data), max_bytes, cap_key)
    return data


def _read_local(path: str, offset: int, size: int, max_bytes: int | None = None,
                cap_key: str = "decode.max_bytes") -> bytes:
    with open_local(path) as f:
        if max_bytes is not None and size < 0:
            total = os.fstat(f.fileno()).st_size - offset
            if total > max_bytes:
                raise too_large(path, total, max_bytes, cap_key)
            f.seek(offset)
            data = f.read(max_bytes + 1)
            if len(data) > max_bytes:  # grew since fstat
                raise too_large(path, len(data), max_bytes, cap_key)
            return data
        f.seek(offset)
        return f.read() if size < 0 else f.read(size)


def arrow_fs(fs) -> Any:
    """An fsspec filesystem as the pyarrow filesystem Ray's readers take (pyarrow's own for local files: listing
    and opening through the fsspec handler costs ~60 ms a file)."""
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return LocalFileSystem()
    return PyFileSystem(FSSpecHandler(fs))
