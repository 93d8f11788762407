"""Progress of a running job: one display on the console, and ``_progress.json`` in the output for
``stylegen status OUTPUT`` (another terminal, another machine, an S3 output).

The driver cannot see inside Ray Data's actors cheaply, but the committed index files are the truth of what
is done: a background thread counts the rows of index files that appeared since the run started (kept,
rejected, failed), derives a rate over its last window and an ETA against this run's planned count, and shows
them. On a terminal that is one tqdm bar updated in place; piped (CI, a Ray job's logs) it is a plain line, no
carriage returns, when the count moved since the last line (at most one every few seconds), and otherwise one
heartbeat line a while, so a long first batch does not fill a job log with identical lines. ``filter`` has a
first pass that writes no index rows (the embeddings): while it runs, the display counts the rows of embedding
files committed since it began (:meth:`ProgressReporter.embedding`), then the index rows as ``run`` does.
``_progress.json`` is rewritten on every tick whatever the console shows.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from typing import Any

import pyarrow.parquet as pq

from pipeline.output.store import OutputStore

log = logging.getLogger(__name__)

INTERVAL_ENV = "STYLEGEN_PROGRESS_S"
DEFAULT_INTERVAL_S = 5.0
BAR_INTERVAL_S = 1.0
RATE_WINDOW_S = 60.0
HEARTBEAT_MIN_S = 30.0  # an unchanged count is shown again after max(this, 6 x the interval)
PROGRESS_FILE = "_progress.json"


def interval_from_env(default: float = DEFAULT_INTERVAL_S) -> float:
    """The interval of the plain lines: ``$STYLEGEN_PROGRESS_S`` (seconds; 0 or less turns the display off)."""
    try:
        return float(os.environ.get(INTERVAL_ENV, default))
    except ValueError:
        log.warning("ignoring %s=%r: not a number", INTERVAL_ENV, os.environ.get(INTERVAL_ENV))
        return default


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def index_statuses(store: OutputStore, path: str) -> list[str]:
    """The status column of one committed index file. Read on this thread (``use_threads=False``): the files are
    small, and a short-lived process that read parquet on Arrow's thread pool can abort at exit (``terminate called
    without an active exception``, seen with ``stylegen status``)."""
    with store.fs.open(path, "rb") as f:
        return pq.read_table(f, columns=["status"], use_threads=False).column("status").to_pylist()


def parquet_rows(store: OutputStore, path: str) -> int:
    """The row count of one committed parquet file, from its footer."""
    with store.fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _rate_eta(rate: float | None, eta_s: float | None, done: bool) -> str:
    eta = "0s" if done else (duration(eta_s) if eta_s is not None else "?")
    return f"{rate:.2f} samples/s | ETA {eta}" if rate is not None else f"? samples/s | ETA {eta}"


def embedding_text(embedded: int, to_embed: int, rate: float | None, eta_s: float | None) -> str:
    """``embedded E/T (x%) | rate/s | ETA``: filter's first pass, in the plain lines and in ``stylegen status``."""
    pct = 100.0 * embedded / to_embed if to_embed else 100.0
    return f"embedded {embedded}/{to_embed} ({pct:.1f}%) | {_rate_eta(rate, eta_s, embedded >= to_embed)}"


def progress_text(written: int, planned: int, counts: dict[str, int], rate: float | None,
                  eta_s: float | None) -> str:
    """``written W/P (x%) kept=K rejected=R failed=F | rate/s | ETA``: the same words in the plain lines and in
    ``stylegen status``."""
    pct = 100.0 * written / planned if planned else 100.0
    return (f"written {written}/{planned} ({pct:.1f}%) kept={counts.get('kept', 0)} "
            f"rejected={counts.get('rejected', 0)} failed={counts.get('failed', 0)} | "
            f"{_rate_eta(rate, eta_s, written >= planned)}")


def _unseen(paths: list[str], seen: set[str], read):
    """``read(path)`` of each path not in ``seen`` yet, which is then added to it; a file that cannot be read yet
    (being replaced, a transient S3 error) stays unseen for the next poll: progress must never break a run."""
    for path in paths:
        if path in seen:
            continue
        try:
            value = read(path)
        except Exception as exc:
            log.debug("progress: cannot read %s yet: %s", path, exc)
            continue
        seen.add(path)
        yield value


class ProgressReporter:
    """Counts this run's committed index rows from a daemon thread; shows them (``display``: "bar", "lines" or
    None; default: a bar on a terminal, lines otherwise) and records them in ``_progress.json``."""

    def __init__(self, store: OutputStore, planned: int, interval_s: float | None = None,
                 clock=time.monotonic, display: str | None = "auto", command: str = "run",
                 total: int | None = None):
        self.store = store
        self.planned = planned
        self.command = command
        self.total = planned if total is None else total  # the dataset's planned count (this run's + skipped)
        lines_s = interval_from_env() if interval_s is None else interval_s
        if display == "auto":
            display = "bar" if sys.stderr.isatty() else "lines"
        if lines_s <= 0:
            display = None
        self.display = display
        self.interval_s = BAR_INTERVAL_S if display == "bar" else (lines_s if lines_s > 0 else DEFAULT_INTERVAL_S)
        self.clock = clock
        self.counts = {"kept": 0, "rejected": 0, "failed": 0}
        self._seen = set(store.index_files())  # committed before this run: not this run's progress
        self._started = clock()
        self._started_at = time.time()
        self._history: deque[tuple[float, int]] = deque([(self._started, 0)])  # (when, done) over the rate window
        self._stop = threading.Event()
        self._polling = threading.Lock()  # the ticker thread and writing() (the caller's thread) both poll
        self._thread: threading.Thread | None = None
        self._bar = None
        self._bar_stage = "write"
        self.rate: float | None = None
        self.eta_s: float | None = None
        self.heartbeat_s = max(HEARTBEAT_MIN_S, 6 * self.interval_s)
        self._shown: tuple[float, str, int] | None = None  # (when, stage, count) of the last plain line
        # filter's embedding pass, while it runs: its store, the files seen, rows embedded, rows to embed
        self._embed: tuple[OutputStore, set[str]] | None = None
        self.embedded = 0
        self.to_embed = 0

    @property
    def stage(self) -> str:
        return "embed" if self._embed is not None else "write"

    def embedding(self, store: OutputStore, to_embed: int) -> None:
        """Count filter's first pass (rows of embedding files that ``store`` commits from now on) until
        :meth:`writing`."""
        self.embedded, self.to_embed = 0, to_embed
        self._embed = (store, set(store.parquet_files(".")))
        self._restart_rate(0)

    def writing(self) -> None:
        """Back to the index rows (the pass that writes the output)."""
        if self._embed is not None:
            self.poll()
            self._embed = None
            self._restart_rate(self.written)

    def _restart_rate(self, count: int) -> None:
        self._history = deque([(self.clock(), count)])

    @property
    def written(self) -> int:
        return sum(self.counts.values())

    def poll(self) -> None:
        """Count the rows of index files (or, during filter's embedding pass, of embedding files) that appeared
        since the last poll (a rewritten file counts once)."""
        with self._polling:
            if self._embed is not None:
                store, seen = self._embed
                self.embedded += sum(_unseen(store.parquet_files("."), seen, lambda p: parquet_rows(store, p)))
                return
            for status in _unseen(self.store.index_files(), self._seen, lambda p: index_statuses(self.store, p)):
                for st in status:
                    self.counts[st] = self.counts.get(st, 0) + 1

    @property
    def _done_of(self) -> tuple[int, int]:
        """(done, total) of the current stage."""
        return (self.embedded, self.to_embed) if self._embed is not None else (self.written, self.planned)

    def _measure(self) -> None:
        now = self.clock()
        done, total = self._done_of
        self._history.append((now, done))
        while len(self._history) > 2 and now - self._history[1][0] >= RATE_WINDOW_S:
            self._history.popleft()
        t0, w0 = self._history[0]
        self.rate = (done - w0) / (now - t0) if now > t0 else 0.0
        left = max(0, total - done)
        self.eta_s = left / self.rate if self.rate > 0 else (0.0 if left == 0 else None)

    def line(self) -> str:
        """``progress: written W/P (x%) kept=K rejected=R failed=F | rate/s | ETA | elapsed`` (``embedded E/T (x%)
        | ...`` during filter's embedding pass)."""
        self._measure()
        text = (embedding_text(self.embedded, self.to_embed, self.rate, self.eta_s) if self._embed is not None
                else progress_text(self.written, self.planned, self.counts, self.rate, self.eta_s))
        return f"progress: {text} | elapsed {duration(self.clock() - self._started)}"

    def record(self, state: str = "running") -> dict[str, Any]:
        """What ``_progress.json`` holds: this run's counts, rate and ETA, and when they were taken."""
        return {"command": self.command, "state": state, "stage": self.stage, "pid": os.getpid(),
                "planned": self.planned, "dataset_planned": self.total, "written": self.written, **self.counts,
                "embedded": self.embedded, "to_embed": self.to_embed, "rate": self.rate, "eta_s": self.eta_s,
                "started_at": self._started_at, "updated_at": time.time()}

    def tick(self, state: str = "running") -> str:
        self.poll()
        text = self.line()
        if self.display == "lines" and self._line_due(state):
            self._shown = (self.clock(), self.stage, self._done_of[0])
            log.info("%s", text)
        elif self.display == "bar":
            self._show_bar()
        self._write(state)
        return text

    def _line_due(self, state: str) -> bool:
        """A plain line is due first, last, when the count moved, or after a heartbeat's silence."""
        if state != "running" or self._shown is None:
            return True
        when, stage, done = self._shown
        return (stage, done) != (self.stage, self._done_of[0]) or self.clock() - when >= self.heartbeat_s

    def _write(self, state: str) -> None:
        try:
            self.store.write_json(PROGRESS_FILE, self.record(state))
        except Exception as exc:  # a status file must never stop a run
            log.debug("progress: cannot write %s: %s", PROGRESS_FILE, exc)

    def _show_bar(self) -> None:
        from tqdm import tqdm

        done, total = self._done_of
        if self._bar is not None and self._bar_stage != self.stage:  # the embedding bar is done: a new one
            self._bar.close()
            self._bar = None
        if self._bar is None:
            self._bar_stage = self.stage
            try:  # a terminal that reports no width (some ptys) would get an empty bar
                sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
            except (OSError, ValueError, AttributeError):
                sized = False
            desc = f"{self.command}: embed" if self._embed is not None else self.command
            self._bar = tqdm(total=total, unit="sample", file=sys.stderr, desc=desc, smoothing=0.1,
                             **({"dynamic_ncols": True} if sized else {"ncols": 100}))
        self._bar.n = done
        if self._embed is None:
            c = self.counts
            self._bar.set_postfix_str(f"kept={c.get('kept', 0)} rejected={c.get('rejected', 0)} "
                                      f"failed={c.get('failed', 0)}", refresh=False)
        self._bar.refresh()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception as exc:  # listing can fail transiently (S3); never kill the run for it
                log.debug("progress poll failed: %s", exc)

    def start(self) -> ProgressReporter:
        self._write("running")
        if self.display == "bar":
            self._show_bar()
        self._thread = threading.Thread(target=self._loop, name="stylegen-progress", daemon=True)
        self._thread.start()
        return self

    def stop(self, state: str = "stopped") -> None:
        """Stop the thread and show the final count (``state``: "finished" when the execution completed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
        try:
            self.tick(state)
        except Exception as exc:
            log.debug("final progress poll failed: %s", exc)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
