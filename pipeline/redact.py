"""Secrets never leave the environment: redaction of URLs, free text, configs and log records.

Whatever stylegen stores or prints (``run.json``, the dataset card, the index, failure reasons, the report, log
lines, the console) goes through here first. Two kinds of secret are known:

- credentials and signing parameters inside URLs (``user:pass@``, presigned S3/GCS/Azure queries, tokens);
- the values of ``ray.runtime_env.env_vars``, which the job receives as environment variables. Their names travel
  to the job's processes in ``STYLEGEN_SECRET_ENV`` so that every process (driver, Ray workers, a submitted
  job) redacts the values it was given without ever writing them down.

Redaction replaces a secret by ``***``; a URL so redacted cannot be read again, and readers (report, reproduce)
say so for that one sample instead of trying.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

REDACTED = "***"
SECRET_ENV = "STYLEGEN_SECRET_ENV"  # comma-separated names of env vars whose values are secrets

# Query and fragment parameters that sign or authorise a request (compared lower-cased, after URL-decoding).
SIGNING_PARAMS = frozenset({
    # AWS SigV4 / SigV2 presigned URLs
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid", "signature",
    # GCS signed URLs (v4 and v2)
    "x-goog-signature", "x-goog-credential", "x-goog-security-token", "googleaccessid",
    # Azure SAS: the signature and its validity window (a SAS is replayable until "se")
    "sig", "se", "skoid", "sktid",
    # generic tokens and keys
    "token", "access_token", "id_token", "refresh_token", "auth", "authorization", "key", "api_key", "apikey",
    "api-key", "x-api-key", "secret", "client_secret", "password", "passwd", "pwd", "credential", "credentials",
    "session_token", "security_token", "code",
})

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
_lock = threading.Lock()
_secrets: set[str] = set()
MIN_SECRET_LEN = 4  # shorter values ("1", "on") are not secrets worth masking in every line of text


def _redact_params(text: str) -> str:
    """``a=1&sig=x`` -> ``a=1&sig=***``: values of signing parameters replaced, everything else byte for byte."""
    parts = []
    for part in text.split("&"):
        name, eq, _ = part.partition("=")
        if eq and unquote(name).strip().lower() in SIGNING_PARAMS:
            part = f"{name}={REDACTED}"
        parts.append(part)
    return "&".join(parts)


def redact_url(url: str) -> str:
    """``url`` without its credentials: userinfo (``user:pass@``) and the values of signing query parameters become
    ``***``; a URL without them comes back unchanged, as does anything that is not a ``scheme://`` URL."""
    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # an unparsable "URL" (bad IPv6 literal ...): keep only its scheme
        return url.split("://", 1)[0] + "://" + REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = _redact_params(parts.query) if parts.query else parts.query
    fragment = _redact_params(parts.fragment) if "=" in parts.fragment else parts.fragment
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def register_secrets(values: Iterable[str]) -> None:
    """Remember values (of env vars) to mask wherever :func:`redact_text` sees them in this process."""
    with _lock:
        _secrets.update(v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_LEN)


def _env_secrets() -> list[str]:
    raw = os.environ.get(SECRET_ENV)
    if not raw:
        return []
    names = [n.strip() for n in raw.split(",") if n.strip()]
    return [os.environ[n] for n in names if os.environ.get(n)]


def redact_text(text: str) -> str:
    """Free text (an exception message, a log line) with every URL passed through :func:`redact_url` and every
    known secret value (:func:`register_secrets`, ``$STYLEGEN_SECRET_ENV``) replaced by ``***``."""
    if not isinstance(text, str) or not text:
        return text
    env = _env_secrets()
    if _secrets or env:  # the common case, none, skips the lock and the sort (redacted for every stored row)
        with _lock:
            secrets = sorted(_secrets.union(env), key=len, reverse=True)
    else:
        secrets = []
    for value in secrets:
        if value in text:
            text = text.replace(value, REDACTED)
    return _URL.sub(_redact_match, text) if "://" in text else text


def _redact_match(match: re.Match) -> str:
    url = match.group(0)
    core = url.rstrip(").,;:!]}")  # "(see https://h/x?sig=s)": the bracket and full stop are prose, not the URL
    return redact_url(core) + url[len(core):]


def redact_value(value: Any) -> Any:
    """Every string inside ``value`` (dicts, lists, tuples) passed through :func:`redact_text`."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


def secret_env(config: Any) -> dict[str, str]:
    """``ray.runtime_env.env_vars`` of a config (model or dumped dict), the values to keep secret."""
    ray = getattr(config, "ray", None)
    runtime_env = getattr(ray, "runtime_env", None) if ray is not None else \
        ((config.get("ray") or {}).get("runtime_env") if isinstance(config, Mapping) else None)
    env = (runtime_env or {}).get("env_vars") if isinstance(runtime_env, Mapping) else None
    return {str(k): v for k, v in env.items() if isinstance(v, str)} if isinstance(env, Mapping) else {}


def public_config(config: Any) -> dict[str, Any]:
    """A config as it may be stored or shown: ``ray.runtime_env.env_vars`` values as ``***`` (names kept), URLs
    without credentials, known secrets masked. Takes a config model or its JSON dump."""
    dumped = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config or {})
    register_secrets(secret_env(dumped).values())
    out = redact_value(dumped)
    env = ((out.get("ray") or {}).get("runtime_env") or {}).get("env_vars")
    if isinstance(env, dict):
        out["ray"]["runtime_env"]["env_vars"] = {k: REDACTED for k in env}
    return out


def is_redacted(url: str | None) -> bool:
    """True for a URL whose credentials were removed before it was stored: it cannot be read again."""
    return isinstance(url, str) and REDACTED in url


class _RedactingFactory:
    """A log record factory that formats the message once, redacted (URLs, secret values, the traceback), so
    that no handler of this process (ours, Ray's, a worker's forwarded to the driver) writes a secret."""

    def __init__(self, base):
        self.base = base

    def __call__(self, *args, **kwargs) -> logging.LogRecord:
        record = self.base(*args, **kwargs)
        try:
            message = record.getMessage()
            clean = redact_text(message)
            if clean != message:
                record.msg, record.args = clean, ()
            if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
                record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        except Exception:  # a record that cannot be formatted is left for logging's own error report
            pass
        return record


def install_log_redaction() -> None:
    """Redact every log record created in this process from now on (idempotent)."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(factory))


def apply_secret_env(env_vars: Mapping[str, str]) -> dict[str, str | None]:
    """Set ``env_vars`` (and ``STYLEGEN_SECRET_ENV`` naming them) in this process's environment, for an embedded
    Ray whose workers inherit it; return the previous values for :func:`restore_env`."""
    if not env_vars:
        return {}
    names = sorted(set(env_vars) | set(filter(None, os.environ.get(SECRET_ENV, "").split(","))))
    wanted = {**env_vars, SECRET_ENV: ",".join(names)}
    previous = {k: os.environ.get(k) for k in wanted}
    register_secrets(env_vars.values())
    os.environ.update(wanted)
    return previous


def restore_env(previous: Mapping[str, str | None]) -> None:
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
