"""A run that stops progressing ends with one line saying what the cluster lacks, never a silent hang.

Ray Data's no-progress guard (the dataset's ``execution_no_progress_timeout_s``, set from
``ray.stall_timeout_s`` by :func:`guard` on the stylize/score execution only: planning keeps Ray Data's default)
raises ``ExecutionTimeoutError`` in the driver when no block was taken from or queued at any stage for that long;
it has shut the execution down (actors released) by the time the driver sees it. So :class:`StallWatch` samples
Ray's resources and nodes while the step runs and, on that error, names the cause from a sample taken during the
stall: a lost node, no CPU left beside the actor pools for the decode and write tasks, or no GPU for a pool.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from pipeline.errors import exception_chain

log = logging.getLogger(__name__)

TASK_CPUS = 1.0  # what one decode or write task asks Ray for (Ray Data's default)


class Stalled(RuntimeError):
    """Nothing progressed for ``ray.stall_timeout_s``; the message is the one line the CLI prints."""


@dataclass(frozen=True)
class Pool:
    name: str  # the config block: "operator", "scoring"
    num_cpus: float
    num_gpus: float
    actors: tuple[int, int]

    def text(self) -> str:
        gpus = f", num_gpus {self.num_gpus:g}" if self.num_gpus else ""
        return f"{self.name} {self.actors[0]}-{self.actors[1]} x num_cpus {self.num_cpus:g}{gpus}"


@dataclass(frozen=True)
class Sample:
    at: float
    free: dict[str, float]
    total: dict[str, float]
    alive: frozenset[str]


def take_sample() -> Sample:
    import ray

    alive = frozenset(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    return Sample(time.monotonic(), ray.available_resources(), ray.cluster_resources(), alive)


def stall_reason(start: Sample, during: Sample, pools: list[Pool]) -> str:
    """What kept the pipeline from progressing, from Ray's state during the stall; several causes join with ';'."""
    causes = []
    lost = start.alive - during.alive
    if lost:
        causes.append(f"a node was lost ({len(lost)} of {len(start.alive)} gone)")
    cpu_total, cpu_free = during.total.get("CPU", 0.0), during.free.get("CPU", 0.0)
    if cpu_free < TASK_CPUS:
        causes.append(f"no CPU left for decode/write tasks: the actor pools hold {cpu_total - cpu_free:g} of "
                      f"{cpu_total:g} CPUs ({', '.join(p.text() for p in pools)})")
    gpu_total = during.total.get("GPU", 0.0)
    for pool in pools:
        if pool.num_gpus > gpu_total:
            causes.append(f"the {pool.name} pool asks {pool.num_gpus:g} GPU per actor and the cluster has "
                          f"{gpu_total:g}")
    if not causes:
        causes.append(f"Ray shows {cpu_free:g} of {cpu_total:g} CPUs and {during.free.get('GPU', 0.0):g} of "
                      f"{gpu_total:g} GPUs free: a task or actor may be stuck, or one batch takes longer than that")
    return "; ".join(causes)


def guard(ds, timeout_s: float) -> None:
    """Stop ``ds``'s execution when nothing moves for ``timeout_s`` (0: never; Ray Data's -1)."""
    ds.context.execution_no_progress_timeout_s = timeout_s or -1


def timeout_in(exc: BaseException | None) -> BaseException | None:
    """Ray Data's ExecutionTimeoutError in ``exc`` or its cause chain."""
    from ray.data.exceptions import ExecutionTimeoutError

    return next((err for err in exception_chain(exc) if isinstance(err, ExecutionTimeoutError)), None)


class StallWatch:
    """``with StallWatch(timeout_s, pools):`` around a Ray Data execution: a stall raises :class:`Stalled`."""

    def __init__(self, timeout_s: float, pools: list[Pool], interval_s: float | None = None):
        self.timeout_s = timeout_s
        self.pools = pools
        self.interval_s = interval_s or max(0.5, min(5.0, timeout_s / 5))
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(take_sample())
            except Exception as exc:  # a GCS hiccup must never break the run
                log.debug("stall watch: cannot read Ray's state: %s", exc)
            keep = self.timeout_s + 4 * self.interval_s  # bounded: only the last window matters
            while len(self.samples) > 2 and self.samples[-1].at - self.samples[1].at > keep:
                self.samples.pop(1)  # samples[0] is the start

    def __enter__(self) -> StallWatch:
        if self.timeout_s > 0:
            self.samples = [take_sample()]
            self._thread = threading.Thread(target=self._loop, name="stylegen-stall-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if exc is None or self._thread is None or timeout_in(exc) is None:
            return
        raise Stalled(self.line()) from exc

    def during(self) -> Sample:
        """The sample nearest the middle of the stalled window (the end is the shutdown, actors released)."""
        now = time.monotonic()
        middle = now - self.timeout_s / 2
        later = self.samples[1:] or self.samples
        return min(later, key=lambda s: abs(s.at - middle))

    def line(self) -> str:
        try:
            reason = stall_reason(self.samples[0], self.during(), self.pools)
        except Exception as exc:  # the line must come out even if Ray's state does not
            reason = f"Ray's state is unreadable ({exc.__class__.__name__})"
        return (f"run stalled: nothing progressed for {self.timeout_s:g}s (ray.stall_timeout_s): {reason}; "
                "what is committed is kept: rerun the same command to resume")
