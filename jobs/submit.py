"""Ray Jobs: submit a run to a cluster, follow it, stop it.

The job ships this project as its ``working_dir`` (Ray applies ``.gitignore``; ``.venv``, outputs and caches
are excluded too) and the resolved config in an environment variable, so what runs is exactly what
``stylegen validate`` accepted here. The submission id is derived from the resolved config: submitting the
same run twice attaches to the job already running instead of starting a second writer on one output.

Ray 2.60 clusters use token authentication by default. The client sends the token from ``RAY_AUTH_TOKEN``
or the token file (``~/.ray/auth_token``, or ``RAY_AUTH_TOKEN_PATH``); see the README.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from pipeline.config import ConfigError, RunConfig
from pipeline.fs import is_remote

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_ENV = "STYLEGEN_CONFIG_YAML"
EXCLUDES = [".venv", ".git", "out", "benchmarks/out", "**/__pycache__", ".pytest_cache", ".ruff_cache"]
TERMINAL_RETRYABLE = {"FAILED", "STOPPED"}


def _enable_token_auth() -> None:
    """Make the Ray client send a token when one is available (must run before Ray reads its settings)."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"


def client(address: str):
    _enable_token_auth()
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submission_base(config: RunConfig) -> str:
    blob = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return "stylegen-" + hashlib.sha1(blob.encode()).hexdigest()[:12]


def check_submittable(config: RunConfig) -> None:
    path = config.output.path
    if not is_remote(path) and not os.path.isabs(path):
        raise ConfigError(f"output.path: {path!r} is relative; a cluster job needs an absolute path or s3:// URL")


def entrypoint() -> str:
    return f"python -m jobs.cli run env:{CONFIG_ENV} --address auto"


def runtime_env(config: RunConfig) -> dict:
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=True)
    env_vars = {CONFIG_ENV: text}
    for name in ("STYLEGEN_CACHE", "HF_HUB_OFFLINE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        if os.environ.get(name):  # locations only; credentials stay on the cluster's own environment
            env_vars[name] = os.environ[name]
    return {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES, "env_vars": env_vars}


def submit(config: RunConfig, address: str) -> tuple[str, bool]:
    """Submit (or find) the job for ``config``; return ``(submission_id, newly_submitted)``."""
    check_submittable(config)
    jobs = client(address)
    base = submission_base(config)
    attempt = 1
    while True:
        sub_id = base if attempt == 1 else f"{base}-{attempt}"
        status = _status_or_none(jobs, sub_id)
        if status is None:
            break
        if status not in TERMINAL_RETRYABLE:  # PENDING/RUNNING: attach; SUCCEEDED: done already
            return sub_id, False
        attempt += 1  # a failed or stopped attempt: resume under a new id (the run itself resumes)
    _retry_transient(lambda: jobs.submit_job(entrypoint=entrypoint(), submission_id=sub_id,
                                             runtime_env=runtime_env(config),
                                             metadata={"tool": "stylegen", "output": config.output.path}))
    return sub_id, True


TRANSIENT = ("No available agent", "try again later", "status code 502", "status code 503", "status code 504")


def _retry_transient(call, attempts: int = 12, delay: float = 2.0):
    """Retry a Jobs API call while the cluster says it is not ready yet (a head still starting its agents)."""
    for attempt in range(attempts):
        try:
            return call()
        except RuntimeError as exc:
            if attempt == attempts - 1 or not any(t in str(exc) for t in TRANSIENT):
                raise
            log.info("Ray Jobs API not ready (%s); retrying in %.0fs", str(exc)[:120], delay)
            time.sleep(delay)
            delay = min(delay * 1.5, 15.0)


def _status_or_none(jobs, sub_id: str) -> str | None:
    try:
        return str(jobs.get_job_status(sub_id).value)
    except RuntimeError as exc:  # Ray raises RuntimeError for an unknown submission id
        if "does not exist" in str(exc) or "404" in str(exc):
            return None
        raise


def status(address: str, job_id: str) -> dict:
    info = client(address).get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value), "message": info.message,
            "entrypoint": info.entrypoint}


def logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def stop(address: str, job_id: str) -> bool:
    return client(address).stop_job(job_id)


def wait(address: str, job_id: str, out=sys.stdout) -> str:
    """Stream the job's logs until it ends; return its final status."""
    jobs = client(address)

    async def _tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(_tail())
    return str(jobs.get_job_status(job_id).value)
