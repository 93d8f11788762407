"""One place that turns a URL (local path or ``s3://``) into an fsspec filesystem.

S3 settings come from the environment (``AWS_*``, including ``AWS_ENDPOINT_URL`` for S3-compatible
stores); credentials are never copied into configs, logs or ``run.json``.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def storage_options(url: str) -> dict[str, Any]:
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {}
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for a URL; local paths are made absolute."""
    if not is_remote(url):
        url = os.path.abspath(url.removeprefix("file://"))
    return url_to_fs(url, **storage_options(url))


def join(base: str, *parts: str) -> str:
    """Join path parts for local paths and URLs alike."""
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL a path on ``fs`` can be reopened with through :func:`get_fs`."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("file", "local"):
        return path
    return f"{protocol}://{path}"


def read_range(url: str, offset: int = 0, size: int = -1) -> bytes:
    """Read a whole object, or ``size`` bytes at ``offset`` (a member inside a tar)."""
    fs, path = get_fs(url)
    if size < 0:
        return fs.cat_file(path)
    return fs.cat_file(path, start=offset, end=offset + size)
