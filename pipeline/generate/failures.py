"""Operator failures that are not one sample's problem: out of GPU memory, a poisoned device, a failure storm.

A sample that an operator cannot stylize is a ``failed`` row and the run goes on. Three failures are not about a
sample, and failing samples for them wastes GPU hours: an out-of-memory error (the batch was too big, not the
samples bad: :func:`out_of_memory`), an error that leaves the CUDA context unusable (every later call on that
process fails too: :func:`device_unusable`), and the same failure for nearly every sample (broken weights or a
broken install: :class:`FailureBreaker`). Their ends are :class:`DeviceUnusable` (the actor process exits and Ray
replaces it) and :class:`RunStopped` (the run stops with one line).
"""

from __future__ import annotations

import re
import threading
from collections import deque
from typing import Any

from pipeline.config import FailuresConfig
from pipeline.errors import exception_chain

# Messages of CUDA, cuBLAS, cuDNN and NCCL errors after which the process's CUDA context is unusable: CUDA errors
# are "sticky", so every later kernel launch on the process fails with the same error and only a fresh process
# gets a working device. An error is recognised by its message because torch raises them all as RuntimeError
# (torch.AcceleratorError on recent versions) with these texts; an out-of-memory error is not one of them.
DEVICE_ERRORS = (
    "CUDA error: an illegal memory access was encountered",
    "CUDA error: device-side assert triggered",
    "CUDA error: unspecified launch failure",
    "CUDA error: misaligned address",
    "CUDA error: an illegal instruction was encountered",
    "CUDA error: uncorrectable ECC error encountered",
    "CUDA error: the launch timed out and was terminated",
    "CUDA error: unknown error",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUBLAS_STATUS_INTERNAL_ERROR",
    "CUDNN_STATUS_EXECUTION_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR",
    "cuDNN error",
    "NCCL error",
)

# The text a stylize actor exits with (``SystemExit``): Ray reports it as the exit detail of the dead actor, and
# the driver finds it there when the actor's restarts (``operator.max_restarts``) are spent.
DEVICE_EXIT = "stylegen: device unusable: "


def out_of_memory(exc: BaseException) -> bool:
    """A torch out-of-memory error (the class exists on CPU builds too; torch is imported only to check)."""
    import torch

    return any(isinstance(e, torch.cuda.OutOfMemoryError) for e in exception_chain(exc))


def free_device_memory() -> None:
    """Give the failed batch's cached blocks back before its halves are tried."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_unusable(exc: BaseException) -> str | None:
    """The error text when ``exc`` leaves the device unusable (:data:`DEVICE_ERRORS`), else None."""
    for e in exception_chain(exc):
        text = str(e)
        lowered = text.lower()
        if any(marker.lower() in lowered for marker in DEVICE_ERRORS):
            first = (text.strip().splitlines() or [""])[0]
            return f"{e.__class__.__name__}: {first}"[:500]
    return None


class DeviceUnusable(SystemExit):
    """Raised in a stylize actor whose device is poisoned: the process exits, Ray starts a fresh one and retries
    the batch there; no sample is failed for it. Ray counts it against the actor's ``max_restarts``."""

    def __init__(self, reason: str):
        super().__init__(f"{DEVICE_EXIT}{reason}")


def normalise(reason: str) -> str:
    """A failure reason without what differs from sample to sample (numbers, ids, hashes), so that one cause
    is one reason."""
    text = reason.strip().lower()
    text = re.sub(r"0x[0-9a-f]+|\b[0-9a-f]{8,}\b", "#", text)
    text = re.sub(r"\d+(\.\d+)?", "#", text)
    return text[:300]


class SystemicFailure(RuntimeError):
    """Raised in a stylize actor when its operator failures look systematic: the run stops (Ray fails the
    dataset with it) instead of writing a failed row per sample."""

    def __init__(self, reason: str, failed: int, seen: int):
        super().__init__(f"{failed} of the last {seen} samples failed in the operator with one reason: {reason}")
        self.reason, self.failed, self.seen = reason, failed, seen

    def __reduce__(self):  # Ray pickles it to the driver
        return (SystemicFailure, (self.reason, self.failed, self.seen))


class FailureBreaker:
    """The operator outcomes of one stylize actor (a sample stylized, or the reason it failed), over the last
    ``window`` samples: at least ``min_failures`` of them failing with one (normalised) reason, and making
    ``ratio`` of the window or more, raises :class:`SystemicFailure`. Only the operator's failures count: a
    sample whose input did not decode never reaches it (bad input is normal input)."""

    def __init__(self, config: FailuresConfig | dict[str, Any] | None = None):
        self.config = FailuresConfig.model_validate(config or {})
        self.recent: deque[str | None] = deque(maxlen=self.config.window)
        self.lock = threading.Lock()  # a GPU actor's two calls (pipeline.generate.run.feeding_args) record at once

    def record(self, reason: str | None) -> None:
        """One sample's outcome: None when the operator stylized it, else its failure reason."""
        if not self.config.enabled:
            return
        key = normalise(reason) if reason else None
        with self.lock:
            self.recent.append(key)
            if key is None:
                return
            failed, seen = sum(1 for r in self.recent if r == key), len(self.recent)
        if failed >= self.config.min_failures and failed >= self.config.ratio * seen:
            raise SystemicFailure(reason, failed, seen)


class RunStopped(RuntimeError):
    """A run stopped on purpose (a failure storm, a device that keeps dying): its message is one line; the CLI
    prints it with how to resume (``retry_failed``: whether the resume should re-plan the failed samples)."""

    def __init__(self, message: str, retry_failed: bool):
        super().__init__(message)
        self.retry_failed = retry_failed


def stop_reason(exc: BaseException, max_restarts: int) -> RunStopped | None:
    """The :class:`RunStopped` for what stopped a run's dataset, when it was a failure storm or a device that
    kept dying; None for anything else."""
    for e in exception_chain(exc):
        if isinstance(e, SystemicFailure):
            return RunStopped(f"stopped: operator failures look systematic: {e.failed} of the last {e.seen} samples "
                              f"on one stylize actor failed with {e.reason!r} (operator.failures)", True)
    for e in exception_chain(exc):
        text = str(e)
        at = text.find(DEVICE_EXIT)
        if at >= 0:
            reason = text[at + len(DEVICE_EXIT):].splitlines()[0].strip().rstrip(".")
            return RunStopped(f"stopped: the stylize device kept failing after {max_restarts} replacements of its "
                              f"actor (operator.max_restarts): {reason}", False)
    return None
