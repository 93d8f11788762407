"""One writer per output (docs/architecture.md §5.4): a lease held for the whole life of a run, filter or repair.

Locally the lease is an exclusive ``flock`` on ``OUTPUT/_lease``: the kernel drops it when the holder dies, so a
crashed run never blocks the next one. The file holds the holder's host, pid and start time for the message a
second writer prints. On S3 there are no locks: the lease is an object created with a conditional PUT
(``If-None-Match: *``), renewed by a heartbeat thread with ``If-Match`` on its ETag, and taken over only after
it has not been renewed for ``ttl_s`` seconds (a crashed holder), judged by the store's own clock (the object's
``LastModified`` against the response's ``Date``), so a taker with a wrong clock cannot steal a live lease. A
refused conditional write is recognised by its error code (``PreconditionFailed``, HTTP 412), never by text.

The local ``_lease`` is opened without following links and without blocking, and must be a regular file: a
symlink (whose target would be truncated) or a FIFO (which would hang) is refused with one line. No library
offers a lease on an fsspec URL, so this is hand-written.
"""

from __future__ import annotations

import _thread
import contextlib
import email.utils
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import stat
import threading
import time
import uuid
from typing import Any

from fsspec.asyn import sync

from pipeline.errors import exception_chain
from pipeline.io.fs import file_kind, get_fs, is_remote

log = logging.getLogger(__name__)

LEASE_NAME = "_lease"


class LeaseHeld(RuntimeError):
    """Another writer holds the output; the CLI prints this as one line and exits 2."""


class LeaseRefused(LeaseHeld):
    """``_lease`` is not a regular file (a symlink, FIFO, folder): never followed or opened for writing."""


_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _open_lease(path: str, url: str, flags: int) -> int:
    """Open ``path`` without following a link or blocking on a FIFO; refuse anything but a regular file."""
    try:
        fd = os.open(path, flags | _OPEN_FLAGS, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (os.path.islink(path)):
            raise LeaseRefused(f"{url}: {path} is a symlink; refusing to follow it (remove it)") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise LeaseRefused(f"{url}: {path} is a {file_kind(mode)}, not a regular file; refusing it (remove it)")
    os.set_blocking(fd, True)
    return fd


def _holder_text(url: str, info: dict[str, Any] | None) -> str:
    if not info:
        return f"{url}: being written by another process (lease file {LEASE_NAME} is locked)"
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.get("started", 0)))
    return f"{url}: being written by {info.get('host', '?')} pid {info.get('pid', '?')} since {since}"


def _me(ttl_s: float) -> dict[str, Any]:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "renewed": now, "ttl_s": ttl_s,
            "token": uuid.uuid4().hex}


class Lease:
    """Held from :meth:`acquire` until :meth:`release` (a context manager too)."""

    def __init__(self, url: str, ttl_s: float = 120.0):
        self.url = url
        self.ttl_s = float(ttl_s)
        self.remote = is_remote(url)
        self.fs, root = get_fs(url)
        self.path = f"{root.rstrip('/')}/{LEASE_NAME}"
        self.info: dict[str, Any] | None = None
        self.lost: str | None = None
        self._fd: int | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- public ---------------------------------------------------------------------------------------
    def acquire(self) -> Lease:
        """Take the lease or raise :class:`LeaseHeld` naming the holder."""
        (self._acquire_s3 if self.remote else self._acquire_local)()
        return self

    def check(self) -> None:
        """Raise :class:`LeaseHeld` if another writer holds the lease now; creates and takes nothing. A run calls
        it before planning, so a second writer is refused at once rather than after its plan."""
        if self.remote:
            try:
                current = self._s3("get_object")
            except FileNotFoundError:
                return
            holder = _parse(sync(self.fs.loop, _read_body, current["Body"]))
            if holder and _store_age(current) < float(holder.get("ttl_s", self.ttl_s)):
                raise LeaseHeld(_holder_text(self.url, holder))
            return
        try:
            fd = _open_lease(self.path, self.url, os.O_RDONLY)
        except LeaseRefused:
            raise
        except OSError:
            return  # no lease file (a new output) or not readable: acquire decides
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            raise LeaseHeld(_holder_text(self.url, _parse(os.pread(fd, 65536, 0)))) from None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.remote:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=30)
            if self._etag and not self.lost:
                with contextlib.suppress(Exception):  # an unreleased lease only expires later
                    self._s3("delete_object", IfMatch=self._etag)
            self._etag = None
        elif self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- local: flock ---------------------------------------------------------------------------------
    def _acquire_local(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = _open_lease(self.path, self.url, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 65536, 0)
            os.close(fd)
            raise LeaseHeld(_holder_text(self.url, _parse(raw))) from None
        self.info = _me(self.ttl_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.info).encode(), 0)
        self._fd = fd

    # ---- S3: conditional PUT and a heartbeat -----------------------------------------------------------
    def _s3(self, method: str, **kwargs):
        bucket, _, key = self.path.partition("/")
        return self.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)

    def _put(self, info: dict[str, Any], **condition) -> str:
        return self._s3("put_object", Body=json.dumps(info).encode(), **condition)["ETag"]

    def _acquire_s3(self) -> None:
        self.info = _me(self.ttl_s)
        for _ in range(5):
            try:
                self._etag = self._put(self.info, IfNoneMatch="*")
                break
            except Exception as exc:
                if not precondition_failed(exc):
                    raise
            try:
                current = self._s3("get_object")
                raw, etag = sync(self.fs.loop, _read_body, current["Body"]), current["ETag"]
            except FileNotFoundError:
                continue  # released between our PUT and GET: try again
            holder = _parse(raw)
            age = _store_age(current)
            if holder and age < float(holder.get("ttl_s", self.ttl_s)):
                raise LeaseHeld(_holder_text(self.url, holder))
            log.warning("%s: taking over an expired lease of %s pid %s (not renewed for %.0f s)", self.url,
                        (holder or {}).get("host"), (holder or {}).get("pid"), age)
            with contextlib.suppress(Exception):  # someone else may take it first: then our PUT fails again
                self._s3("delete_object", IfMatch=etag)
        else:
            raise LeaseHeld(_holder_text(self.url, None))
        self._thread = threading.Thread(target=self._heartbeat, name="stylegen-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        period = max(0.5, self.ttl_s / 4)
        while not self._stop.wait(period):
            info = {**self.info, "renewed": time.time()}
            try:
                self._etag = self._put(info, IfMatch=self._etag)
                self.info = info
            except Exception as exc:
                if precondition_failed(exc) or isinstance(exc, FileNotFoundError) or \
                        time.time() - self.info["renewed"] > self.ttl_s:
                    self._lose(f"{self.url}: lost the writer lease ({exc.__class__.__name__}: {exc})")
                    return
                log.warning("%s: lease renewal failed, will retry: %s", self.url, exc)

    def _lose(self, why: str) -> None:
        """Another writer may now write here: stop this run rather than write beside it."""
        self.lost = why
        log.error("%s; stopping", why)
        for sig in (signal.SIGINT, signal.SIGTERM):  # the CLI handles both; a bare process SIGINT
            if callable(signal.getsignal(sig)):
                _thread.interrupt_main(sig)
                return
        # No Python handler: SIGINT is ignored in a background job (`cmd &`) and interrupt_main would do nothing.
        os.kill(os.getpid(), signal.SIGTERM)


async def _read_body(body) -> bytes:
    async with body as stream:
        return await stream.read()


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _store_age(response: dict[str, Any]) -> float:
    """Seconds since the lease object was last written, by the store's clock: the response's ``Date`` minus the
    object's ``LastModified`` (this host's clock only when the store sends no ``Date``)."""
    modified = response.get("LastModified")
    if modified is None:
        return float("inf")
    date = (response.get("ResponseMetadata", {}).get("HTTPHeaders") or {}).get("date")
    try:
        now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
    except (TypeError, ValueError):
        now = time.time()
    return now - modified.timestamp()


def precondition_failed(exc: Exception) -> bool:
    """A conditional write refused by the store: error code ``PreconditionFailed`` (or a conflicting
    concurrent conditional write), HTTP 412/409. s3fs turns botocore's ClientError into OSError subclasses and
    keeps it as the cause; the code is read from there, never from the message text."""
    for err in exception_chain(exc):
        response = getattr(err, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return True
    return False
