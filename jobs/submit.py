"""Ray Jobs: submit a run to a cluster, follow it, stop it.

The job ships this project as its ``working_dir`` (Ray applies ``.gitignore``; ``.venv``, outputs and caches
are excluded too) and the resolved config in an environment variable, so what runs is exactly what
``stylegen validate`` accepted here. A stylegen installed from a wheel has no project folder: it ships its three
packages as ``py_modules`` instead (relative source paths then resolve in the job's own working directory, so
use absolute or ``s3://`` ones). The submission id is derived from the resolved config: submitting the
same run twice attaches to the job already running instead of starting a second writer on one output.

The entrypoint's first line (:mod:`jobs.depcheck`) checks that the cluster's ``python`` can import the
dependencies and otherwise fails with one line saying which and how to fix it. ``ray.runtime_env`` of the config
(Ray's own keys) is merged into the job's; ``--ship-deps`` adds the tested set (``requirements.lock``, the runtime
section; the wheel carries it as ``jobs/requirements.lock``) as ``pip`` or ``uv``.

Ray 2.60 clusters use token authentication by default. The client sends the token from ``RAY_AUTH_TOKEN``
or the token file (``~/.ray/auth_token``, or ``RAY_AUTH_TOKEN_PATH``), with no ``RAY_AUTH_MODE`` needed
(:mod:`jobs.auth`); see the README.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import importlib.resources
import json
import logging
import os
import re
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import yaml

from jobs.auth import enable_token_auth
from pipeline.config import ConfigError, RunConfig
from pipeline.io.fs import is_remote
from pipeline.redact import REDACTED, SECRET_ENV, redact_url

log = logging.getLogger(__name__)

PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # the source checkout, or site-packages for a wheel install
PACKAGES = ("operators", "pipeline", "jobs")
CONFIG_ENV = "STYLEGEN_CONFIG_YAML"
EXCLUDES = [".venv", ".git", "out", "benchmarks/out", "**/__pycache__", ".pytest_cache", ".ruff_cache"]
TERMINAL_RETRYABLE = {"FAILED", "STOPPED"}


def client(address: str):
    """A Jobs API client that sends the token when one is available, whatever imported Ray before."""
    enable_token_auth()
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def kind(config) -> str:
    """``run`` or ``filter``: the CLI command the job runs."""
    return "run" if isinstance(config, RunConfig) else "filter"


def submission_base(config, ship_deps: str | None = None) -> str:
    """The job id stem of ``config``: what the user set, so that a release adding a config key with a default
    does not change the id of an unchanged config (a resubmission finds its running job instead of racing it)."""
    what = _masked_env(config.model_dump(mode="json", exclude_defaults=True))  # an id is public: no secret in it
    what |= {"ship_deps": ship_deps} if ship_deps else {}
    blob = json.dumps(what, sort_keys=True)
    return "stylegen-" + hashlib.sha1(blob.encode()).hexdigest()[:12]


def check_submittable(config) -> None:
    paths = [("output.path", config.output.path)]
    if kind(config) == "filter":
        paths += [("input.shards", config.input.shards), ("embeddings.path", config.embeddings.path)]
    for key, path in paths:
        if path and not is_remote(path) and not os.path.isabs(os.path.expanduser(path)):
            raise ConfigError(f"{key}: {path!r} is relative; a cluster job needs an absolute path or s3:// URL")


# Import names of the required distributions where they differ (the probe checks that the cluster can import them).
IMPORT_NAMES = {"pillow": "PIL", "pyyaml": "yaml", "open-clip-torch": "open_clip", "faiss-cpu": "faiss",
                "huggingface-hub": "huggingface_hub"}


def _checkout() -> Path | None:
    """The stylegen source checkout this code runs from, or ``None`` when it runs from an installed wheel."""
    try:
        with open(PACKAGE_PARENT / "pyproject.toml", "rb") as f:
            name = tomllib.load(f).get("project", {}).get("name")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return PACKAGE_PARENT if name == "stylegen" else None


PROJECT_ROOT = _checkout()
LOCK_MARKER = "# --- test extras and tools"  # scripts/lock.py: the runtime closure comes before this line


def requirements() -> list[str]:
    """The tested runtime set (``requirements.lock`` up to its test section), exact pins as pip/uv take them.

    Read as package data (``jobs/requirements.lock``: a link to the repository's lock in a checkout, a copy in
    the wheel), so ``--ship-deps`` works from an editable and from a wheel install alike."""
    try:
        text = importlib.resources.files("jobs").joinpath("requirements.lock").read_text()
    except (OSError, ModuleNotFoundError) as exc:
        raise ConfigError("--ship-deps: this stylegen has no requirements.lock (a build without its package data?): "
                          "install it from the repository or its wheel, or set ray.runtime_env pip/uv "
                          f"yourself ({exc})") from None
    pins = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(LOCK_MARKER):
            break
        if line and not line.startswith("#"):
            pins.append(line)
    return pins


def dependencies() -> list[str]:
    """The direct dependencies (``[project.dependencies]``, ranges): from ``pyproject.toml`` in a checkout (the code
    a job ships), else from the installed wheel's metadata."""
    if PROJECT_ROOT is not None:
        with open(PROJECT_ROOT / "pyproject.toml", "rb") as f:
            return list(tomllib.load(f)["project"]["dependencies"])
    return [r for r in importlib.metadata.requires("stylegen") or [] if "extra ==" not in r]


def import_names(reqs: list[str]) -> list[str]:
    names = []
    for req in reqs:
        dist = re.split(r"[\[=<>!~; ]", req, maxsplit=1)[0].strip().lower()
        names.append(IMPORT_NAMES.get(dist, dist.replace("-", "_")))
    return names


def entrypoint(config=None) -> str:
    """The dependency probe, then the run: a cluster whose python lacks a dependency fails on the first line."""
    probe = "python -m jobs.depcheck " + " ".join(import_names(dependencies()))
    return f"{probe} && python -m jobs.cli {kind(config) if config is not None else 'run'} env:{CONFIG_ENV} " \
           "--address auto"


SHIP_DEPS = ("pip", "uv")


def job_config(config) -> dict[str, Any]:
    """The config a job receives in ``STYLEGEN_CONFIG_YAML``: ``ray.runtime_env.env_vars`` values as ``***``
    (the job gets the real ones as environment variables from its runtime_env; an env var is visible in the
    dashboard's job info and would be copied into ``run.json``). Source URLs stay whole: the job reads them."""
    return _masked_env(config.model_dump(mode="json"))


def _masked_env(dumped: dict[str, Any]) -> dict[str, Any]:
    env = ((dumped.get("ray") or {}).get("runtime_env") or {}).get("env_vars")
    if isinstance(env, dict):
        dumped["ray"]["runtime_env"]["env_vars"] = {k: REDACTED for k in env}
    return dumped


def runtime_env(config, ship_deps: str | None = None) -> dict[str, Any]:
    """This project as the working_dir (an installed wheel: its packages as py_modules), the config in an
    environment variable, ``ray.runtime_env`` merged in (its ``env_vars``, ``excludes`` and ``py_modules`` added to
    ours), and with ``ship_deps`` the locked runtime requirements."""
    text = yaml.safe_dump(job_config(config), sort_keys=True)
    env_vars = {}
    for name in ("STYLEGEN_CACHE", "HF_HUB_OFFLINE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        if os.environ.get(name):  # locations only; credentials stay on the cluster's own environment
            env_vars[name] = os.environ[name]
    own = dict(config.ray.runtime_env)
    if "working_dir" in own:
        raise ConfigError("ray.runtime_env.working_dir: a job ships this project as its working_dir; use py_modules "
                          "for more code")
    user_env = own.pop("env_vars", None) or {}
    if not isinstance(user_env, dict) or not all(isinstance(v, str) for v in user_env.values()):
        raise ConfigError("ray.runtime_env.env_vars: must map names to strings")
    secret = {SECRET_ENV: ",".join(sorted(user_env))} if user_env else {}  # the job's processes redact them
    env = {"excludes": EXCLUDES + list(own.pop("excludes", None) or []),
           "env_vars": env_vars | user_env | secret | {CONFIG_ENV: text}}
    if PROJECT_ROOT is not None:
        env["working_dir"] = str(PROJECT_ROOT)
    else:  # a wheel install: ship the installed packages, not the site-packages folder they sit in
        env["py_modules"] = [str(PACKAGE_PARENT / name) for name in PACKAGES] + list(own.pop("py_modules", None) or [])
    env.update(own)
    if ship_deps is not None:
        if ship_deps not in SHIP_DEPS:
            raise ConfigError(f"--ship-deps: {ship_deps!r} is not one of {', '.join(SHIP_DEPS)}")
        taken = [k for k in ("pip", "uv", "conda", "py_executable") if k in env]
        if taken:
            raise ConfigError(f"--ship-deps: ray.runtime_env already sets {', '.join(taken)}; ship the dependencies "
                              "one way")
        env[ship_deps] = {"packages": requirements()}
    return env


def submit(config, address: str, ship_deps: str | None = None) -> tuple[str, bool]:
    """Submit (or find) the job for ``config`` (a run or filter config); return ``(submission_id,
    newly_submitted)``."""
    check_submittable(config)
    env = runtime_env(config, ship_deps)  # a bad ray.runtime_env is refused before the cluster is asked
    jobs = client(address)
    base = submission_base(config, ship_deps)
    attempt = 1
    while True:
        sub_id = base if attempt == 1 else f"{base}-{attempt}"
        status = _status_or_none(jobs, sub_id)
        if status is None:
            break
        if status not in TERMINAL_RETRYABLE:  # PENDING/RUNNING: attach; SUCCEEDED: done already
            return sub_id, False
        attempt += 1  # a failed or stopped attempt: resume under a new id (the run itself resumes)
    _retry_transient(lambda: jobs.submit_job(entrypoint=entrypoint(config), submission_id=sub_id,
                                             runtime_env=env,
                                             metadata={"tool": "stylegen", "output": redact_url(config.output.path)}))
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
    output = (info.metadata or {}).get("output") if (info.metadata or {}).get("tool") == "stylegen" else None
    return {"job_id": job_id, "status": str(info.status.value), "message": info.message,
            "entrypoint": info.entrypoint, "output": output if isinstance(output, str) else None}


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
