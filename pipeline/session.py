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

RAY_CONSOLE_ENV = "STYLEGEN_RAY_CONSOLE"


def ray_console() -> bool:
    """Whether Ray's own console output is shown: its log lines, the workers' output and Ray Data's progress.
    Off unless ``$STYLEGEN_RAY_CONSOLE=1`` (the CLI's ``--debug`` sets it): all of it is in the Ray session's log
    folder (:func:`ray_logs_dir`), and stylegen prints its own progress and warnings."""
    return os.environ.get(RAY_CONSOLE_ENV, "") not in ("", "0")


# A warning of stylegen's own in a Ray worker (a source file skipped, an OOM back-off) is written to the worker's
# stderr behind this mark (worker_logging, Ray's worker_process_setup_hook); the driver shows those lines, once
# each, and leaves the rest of what workers print in the session's log folder.
WORKER_MARK = "stylegen-warning: "
SETUP_HOOK = "pipeline.session.worker_logging"
worker_log = logging.getLogger("pipeline.workers")


def worker_logging() -> None:
    """Run by Ray in every worker process of a stylegen job: stylegen's warnings go to stderr with the mark."""
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(WORKER_MARK + "%(message)s"))
    for name in ("pipeline", "operators"):
        logging.getLogger(name).addHandler(handler)


def _worker_warnings(batch: dict) -> None:
    for line in batch.get("lines") or []:
        at = line.find(WORKER_MARK) if isinstance(line, str) else -1
        if at >= 0:
            worker_log.warning("%s", line[at + len(WORKER_MARK):])


def _forward_worker_output() -> None:
    """What workers print reaches the driver through Ray's log stream; unless :func:`ray_console`, only the marked
    warnings are shown. (Ray's stream dispatcher is internal: without it the warnings stay in the log folder.)"""
    if ray_console():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        dispatcher.remove_handler("ray_print_logs")
        dispatcher.remove_handler("stylegen_warnings")
        dispatcher.add_handler("stylegen_warnings", _worker_warnings)
    except Exception as exc:
        log.debug("worker warnings stay in Ray's log folder: %s", exc)


def ray_logs_dir() -> str | None:
    """The log folder of this process's Ray session (where Ray, Ray Data and the workers log), once Ray runs."""
    try:
        from ray._private import worker

        node = worker.global_worker.node
        return node.get_logs_dir_path() if node is not None else None
    except Exception:  # an internal attribute: a different Ray only loses the path, never the run
        return None


def _ray_data_console(shown: bool) -> None:
    """Ray Data logs to its file in the session folder and to the console; keep the console part off unless
    :func:`ray_console` (its INFO lines per dataset, its warnings, and a failed task's traceback, which the CLI
    replaces with one line)."""
    import ray.data  # noqa: F401  (configures the ray.data loggers, which we then adjust)

    shared = set(logging.getLogger().handlers)  # the process's own (the CLI's console, pytest's capture): kept
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and handler not in shared:
            for old in [f for f in handler.filters if getattr(f, "stylegen", False)]:
                handler.removeFilter(old)
            if not shown:
                handler.addFilter(_OffConsole())


class _OffConsole(logging.Filter):
    """Drops Ray Data's records (and only those) on the handler it is added to."""

    stylegen = True

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "ray.data" or record.name.startswith("ray.data."))


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

    shown = ray_console()
    # Ray's driver-side lines ("Started a local Ray instance", the token-auth notice) stay off the console unless
    # asked; of the workers' output only stylegen's warnings are shown (_forward_worker_output).
    level = {"logging_level": logging.INFO if shown and not quiet else logging.ERROR}
    runtime_env: dict[str, Any] = {"worker_process_setup_hook": SETUP_HOOK}
    if address:
        if env_vars:  # a cluster's workers get them through Ray's runtime_env
            names = ",".join(sorted(env_vars))
            runtime_env["env_vars"] = {**env_vars, SECRET_ENV: names}
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env, **level)
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
                     log_to_driver=True, runtime_env=runtime_env, **level)
        finally:
            restore_env(previous)
    _forward_worker_output()


def configure_data_context(wait_for_actors_s: int, quiet: bool) -> None:
    """Ray Data settings every job shares: its own progress output only when :func:`ray_console` (stylegen shows
    one progress display of its own), and waiting for each pool's minimum actors."""
    from ray.data import DataContext

    shown = ray_console() and not quiet
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = shown
    ctx.print_on_execution_start = shown
    ctx.wait_for_min_actors_s = wait_for_actors_s
    _ray_data_console(shown)


@contextlib.contextmanager
def ray_session(address: str | None, ray_config: RayConfig, *, quiet: bool,
                embedded_warning: Callable[[], str | None] | None = None) -> Iterator[None]:
    """Ray for one command: ``address`` (else ``ray.address``, else an embedded Ray), Ray Data configured, and a
    shutdown at the end only when this call started it. ``embedded_warning`` is asked once when the session is
    embedded (this machine's cores are the whole cluster)."""
    address = address or ray_config.address
    started = init_ray(address, quiet=quiet, runtime_env=ray_config.runtime_env)
    try:
        if started and not ray_console() and ray_logs_dir():
            log.info("Ray's own logs: %s", ray_logs_dir())
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
