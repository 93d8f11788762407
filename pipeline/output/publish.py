"""Publication in order, behind the caller's back (docs/architecture.md §5.3).

A shard's fsync, rename and directory fsync (or its upload) wait on the disk or the network, not on the CPU. A
:class:`Publisher` runs those jobs on one background thread, strictly in submission order, while the caller
stages the next shard; one thread keeps the order of the commit protocol (tar durable and visible, then its
index) without any locking of its own. After the first failure every job still queued is discarded instead of
run, so nothing after a failed shard becomes visible. Submitting job k returns once job k-1 is done: the caller
runs one shard ahead, never more, so a slow disk or store does not pile staged shards up. :meth:`Publisher.close`
(the ``with`` block's end) waits for every job and re-raises that first failure.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait


class Publisher:
    """One background thread that runs ``job`` callables in order; see the module docstring."""

    def __init__(self, ahead: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stylegen-publish")
        self._ahead = ahead  # jobs that may wait behind the running one: bounds what sits in staging
        self._futures: list[Future] = []
        self._failed = threading.Event()

    @property
    def failed(self) -> bool:
        """True once a job failed: stage nothing more, its publication would be discarded."""
        return self._failed.is_set()

    def submit(self, job: Callable[[], None], discard: Callable[[], None]) -> None:
        """Run ``job`` after every job submitted before it; if one of them failed, or ``job`` itself fails, run
        ``discard`` (remove what ``job`` would have published from staging) instead of, or after, it."""
        def run() -> None:
            if self._failed.is_set():
                discard()
                return
            try:
                job()
            except BaseException:
                self._failed.set()
                with contextlib.suppress(OSError):  # the job's own error is the one to report
                    discard()
                raise

        self._futures.append(self._pool.submit(run))
        if len(self._futures) > self._ahead:
            wait([self._futures[-self._ahead - 1]])  # a slow disk or store holds the caller back, not its staging

    def close(self) -> None:
        """Wait for every job; re-raise the first failure (the earliest shard that did not publish)."""
        self._pool.shutdown(wait=True)
        for future in self._futures:
            exc = future.exception()
            if exc is not None:
                raise exc

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            self._pool.shutdown(wait=True)  # an interrupt (SIGINT, SIGTERM) stays the interrupt
            return
        self.close()  # a job's failure came first in shard order: it wins over the caller's own error
