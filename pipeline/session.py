"""The Ray session of a command (``run``, ``plan``, ``filter``): connect to a cluster or start an embedded Ray,
set Ray Data up, run a step whose source errors come back as one line, and shut down only what this process
started. Also where an actor learns its device, and where a GPU request is spelled, so that every command asks
Ray the same way."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from pipeline.config import RayConfig
from pipeline.errors import exception_chain
from pipeline.io.sources import SourceError
from pipeline.redact import REDACTED, SECRET_ENV, apply_secret_env, register_secrets, restore_env, secret_env

log = logging.getLogger(__name__)


def init_ray(address: str | None, quiet: bool = False, runtime_env: dict[str, Any] | None = None) -> bool:
    """Connect to ``address`` or start an embedded local Ray; return True if this call started it.

    The ``env_vars`` of ``runtime_env`` (the config's ``ray.runtime_env``) reach every worker; their values are
    secrets, so they are never logged, and values already redacted (``***``: in a submitted job, which has the
    real ones from its own runtime_env) are not applied."""
    import ray

    env_vars = {k: v for k, v in secret_env({"ray": {"runtime_env": runtime_env or {}}}).items() if v != REDACTED}
    register_secrets(env_vars.values())
    if ray.is_initialized():
        return False
    main = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        _ray_init(address, quiet, env_vars)
    finally:  # ray.init installs handlers of its own; the caller's (a clean stop on SIGTERM/SIGINT) win
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    return True


def _ray_init(address: str | None, quiet: bool, env_vars: dict[str, str]) -> None:
    import ray

    level = {"logging_level": logging.WARNING} if quiet else {}  # --quiet: no "Started a local Ray instance"
    if address:
        if env_vars:  # a cluster's workers get them through Ray's runtime_env
            names = ",".join(sorted(env_vars))
            level["runtime_env"] = {"env_vars": {**env_vars, SECRET_ENV: names}}
        ray.init(address=address, log_to_driver=not quiet, **level)
    else:
        # Logical CPUs only bound concurrency: the stylize and score actors each hold one, and the decode
        # and write tasks need room beside them even on a 2-core laptop.
        # address="local" always starts a private instance, never attaches to a `ray start` cluster that
        # happens to run on this machine.
        # The env vars are inherited by the local raylet (and so by every worker), not passed as a runtime_env
        # that Ray would write into its session logs; this process's environment is restored once Ray runs.
        previous = apply_secret_env(env_vars)
        try:
            ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=not quiet, **level)
        finally:
            restore_env(previous)


def configure_data_context(wait_for_actors_s: int, quiet: bool) -> None:
    """Ray Data settings every job shares: progress output, and waiting for each pool's minimum actors."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet
    ctx.wait_for_min_actors_s = wait_for_actors_s


@contextlib.contextmanager
def ray_session(address: str | None, ray_config: RayConfig, *, quiet: bool,
                embedded_warning: Callable[[], str | None] | None = None) -> Iterator[None]:
    """Ray for one command: ``address`` (else ``ray.address``, else an embedded Ray), Ray Data configured, and a
    shutdown at the end only when this call started it. ``embedded_warning`` is asked once when the session is
    embedded (this machine's cores are the whole cluster)."""
    address = address or ray_config.address
    started = init_ray(address, quiet=quiet, runtime_env=ray_config.runtime_env)
    try:
        warning = embedded_warning() if started and not address and embedded_warning else None
        if warning:
            log.warning(warning)
        configure_data_context(ray_config.wait_for_actors_s, quiet)
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def gpu_args(num_gpus: float) -> dict[str, float]:
    """The GPU request of an actor pool: Ray counts ``num_gpus=0`` as a GPU request (ray#45201), so it is only
    passed when a GPU is wanted."""
    return {"num_gpus": num_gpus} if num_gpus > 0 else {}


def pick_device(num_gpus: float) -> str:
    """The GPU Ray assigned (Ray narrows CUDA_VISIBLE_DEVICES, so it is always cuda:0 here), else CPU."""
    import torch

    return "cuda:0" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


class WorkerSourceError(SourceError):
    """A SourceError raised on a worker: it keeps its message through Ray, which rewrites an exception's args."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):
        return type(self), (self.message,)


def source_error_in(exc: BaseException) -> SourceError | None:
    """The SourceError a Ray failure carries (its cause chain), as a plain SourceError for the CLI."""
    for err in exception_chain(exc):
        if isinstance(err, WorkerSourceError) and isinstance(getattr(err, "message", None), str):
            return SourceError(err.message)
    return None


def run_step(step: Callable[[], Any], what: str) -> Any:
    """Execute a Ray Data step; a source failure on a worker comes back as the SourceError the CLI prints."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    original, ctx.raise_original_map_exception = ctx.raise_original_map_exception, True  # not UserCodeException
    try:
        return step()
    except Exception as exc:
        found = source_error_in(exc)
        if found is None:
            raise
        raise found from None
    finally:
        ctx.raise_original_map_exception = original
