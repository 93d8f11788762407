"""Reading an output that someone else may have edited: ``report`` and ``reproduce`` trust none of its values.

An index row names its shard, a status, a reason; a shard holds image bytes. Any of them may come from a
downloaded or tampered output, so a shard value is accepted only as a plain file name under ``OUTPUT/shards/``,
stored images decode under the same pixel limit as the pipeline's decode (and a byte cap), and values that end
up in HTML attributes are reduced to a known set.
"""

from __future__ import annotations

import posixpath
from typing import Any

from PIL import Image

STATUSES = ("kept", "rejected", "failed")
STORED_MAX_BYTES = 256 * 1024 * 1024  # one stored image member; stylegen's own are a few MB at most
DEFAULT_MAX_PIXELS = 64_000_000  # DecodeConfig.max_pixels' default, for outputs without run.json


class UntrustedValue(ValueError):
    """A value of the output that a reader refuses (the message says which and why)."""


def shard_problem(name: Any) -> str | None:
    """Why ``name`` (an index row's ``shard``) is not a plain ``.tar`` file name under ``shards/``; None if it is."""
    if not isinstance(name, str) or not name:
        return f"shard {name!r} is not a file name"
    if ("/" in name or "\\" in name or "\x00" in name or name in (".", "..") or posixpath.basename(name) != name
            or name.startswith(".") or "://" in name or ":" in name):
        return f"shard {name!r} is not a plain file name under shards/"
    if not name.endswith(".tar"):
        return f"shard {name!r} is not a .tar file"
    return None


def shard_url(shards_dir: str, name: Any) -> str:
    """The shard's location under ``shards_dir``; raises UntrustedValue for anything but a plain file name."""
    problem = shard_problem(name)
    if problem:
        raise UntrustedValue(problem)
    return f"{shards_dir}/{name}"


def status_class(status: Any) -> str:
    """A CSS class for a row's status: one of the known statuses, else ``other`` (never the raw value)."""
    return status if status in STATUSES else "other"


def max_pixels_of(config: dict[str, Any] | None) -> int:
    """The run's ``decode.max_pixels`` (a run.json config dict), else the default."""
    value = ((config or {}).get("decode") or {}).get("max_pixels")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else DEFAULT_MAX_PIXELS


def read_member(tar, member, max_bytes: int = STORED_MAX_BYTES) -> bytes:
    """A tar member's bytes, refused (UntrustedValue) above ``max_bytes`` before anything is read."""
    if member.size > max_bytes:
        raise UntrustedValue(f"member {member.name!r} is {member.size} bytes, more than {max_bytes}")
    return tar.extractfile(member).read()


def open_stored(data: bytes, max_pixels: int) -> Image.Image:
    """A stored image decoded to RGB at full size under ``max_pixels`` (checked from its header first)."""
    from pipeline.io.images import DecodeError, decode_image

    try:
        return decode_image(data, max_pixels=max_pixels)
    except DecodeError as exc:
        raise UntrustedValue(f"stored image: {exc}") from None
