"""Progress of a running job, as one log line every few seconds.

The driver cannot see inside Ray Data's actors cheaply, but the committed index files are the truth of what
is done: a background thread counts the rows of index files that appeared since the run started (kept,
rejected, failed), derives a rate over its last window and an ETA against this run's planned count, and logs
one plain line. Plain log lines read the same in a terminal and in a Ray job's logs (no carriage returns).
Ray Data's own per-operator progress bars (decode, stylize, score, write) come on top when not quiet.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque

import pyarrow.parquet as pq

from pipeline.output.store import OutputStore

log = logging.getLogger(__name__)

INTERVAL_ENV = "STYLEGEN_PROGRESS_S"
DEFAULT_INTERVAL_S = 10.0
RATE_WINDOW_S = 60.0


def interval_from_env(default: float = DEFAULT_INTERVAL_S) -> float:
    """The reporting interval: ``$STYLEGEN_PROGRESS_S`` (seconds; 0 or less turns reporting off)."""
    try:
        return float(os.environ.get(INTERVAL_ENV, default))
    except ValueError:
        log.warning("ignoring %s=%r: not a number", INTERVAL_ENV, os.environ.get(INTERVAL_ENV))
        return default


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressReporter:
    """Counts this run's committed index rows and logs ``progress: ...`` lines from a daemon thread."""

    def __init__(self, store: OutputStore, planned: int, interval_s: float | None = None,
                 clock=time.monotonic):
        self.store = store
        self.planned = planned
        self.interval_s = interval_from_env() if interval_s is None else interval_s
        self.clock = clock
        self.counts = {"kept": 0, "rejected": 0, "failed": 0}
        self._seen = set(store.index_files())  # committed before this run: not this run's progress
        self._started = clock()
        self._history: deque[tuple[float, int]] = deque([(self._started, 0)])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def written(self) -> int:
        return sum(self.counts.values())

    def poll(self) -> None:
        """Count the rows of index files that appeared since the last poll (a rewritten file counts once)."""
        for path in self.store.index_files():
            if path in self._seen:
                continue
            try:
                with self.store.fs.open(path, "rb") as f:
                    status = pq.read_table(f, columns=["status"]).column("status").to_pylist()
            except Exception as exc:  # progress must never break a run; the next poll tries again
                log.debug("progress: cannot read %s yet: %s", path, exc)
                continue
            self._seen.add(path)
            for st in status:
                self.counts[st] = self.counts.get(st, 0) + 1

    def line(self) -> str:
        """``progress: written W/P (x%) kept=K rejected=R failed=F | rate/s | ETA | elapsed``."""
        now = self.clock()
        written = self.written
        self._history.append((now, written))
        while len(self._history) > 2 and now - self._history[1][0] >= RATE_WINDOW_S:
            self._history.popleft()
        t0, w0 = self._history[0]
        rate = (written - w0) / (now - t0) if now > t0 else 0.0
        pct = 100.0 * written / self.planned if self.planned else 100.0
        left = max(0, self.planned - written)
        eta = _duration(left / rate) if rate > 0 else ("0s" if left == 0 else "?")
        c = self.counts
        return (f"progress: written {written}/{self.planned} ({pct:.1f}%) kept={c.get('kept', 0)} "
                f"rejected={c.get('rejected', 0)} failed={c.get('failed', 0)} | {rate:.2f} samples/s | "
                f"ETA {eta} | elapsed {_duration(now - self._started)}")

    def tick(self) -> str:
        self.poll()
        text = self.line()
        log.info("%s", text)
        return text

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception as exc:  # listing can fail transiently (S3); never kill the run for it
                log.debug("progress poll failed: %s", exc)

    def start(self) -> ProgressReporter:
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="stylegen-progress", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and log the final line."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
            try:
                self.tick()
            except Exception as exc:
                log.debug("final progress poll failed: %s", exc)
