"""The one reader of a WebDataset sample's caption (``txt`` or ``json`` member), for ``run`` and ``filter``.

A caption is data from someone else's tar: at most ``MAX_CAPTION_BYTES`` are read, control characters are
stripped and the length capped (``pipeline.sources._prompt_value``). A member that is too big, not UTF-8,
malformed or absurdly nested JSON (10^5 levels: a RecursionError) costs one warning and the caption, never
the sample, the tar or the run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_CAPTION_BYTES = 1_000_000  # a caption member larger than this is not read at all
CAPTION_EXTS = ("txt", "json")  # in this order: the first that yields a caption wins


def read_caption(read: Callable[[int, int], bytes], members: dict, where: str = "", key: str = "") -> str | None:
    """The cleaned caption of one sample, or None. ``read(offset, size)`` returns a member's bytes;
    ``members`` maps extension -> (offset, size); ``where``/``key`` name the tar and sample in warnings."""
    for ext in CAPTION_EXTS:
        if ext not in members:
            continue
        offset, size = members[ext]
        if size > MAX_CAPTION_BYTES:
            _warn(where, key, ext, f"{size} bytes, more than {MAX_CAPTION_BYTES}")
            continue
        try:
            caption = parse_caption(ext, read(offset, size))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            _warn(where, key, ext, f"{exc.__class__.__name__}: {str(exc)[:120]}")
            continue
        if caption:
            return caption
    return None


def parse_caption(ext: str, raw: bytes) -> str | None:
    """The cleaned caption in one member's bytes (None when it holds none); raises ValueError for bytes that are
    not UTF-8 or not JSON and for a caption that is not text or too long, RecursionError for JSON nested too
    deep."""
    from pipeline.sources import PROMPT_COLUMNS, _prompt_value

    text = raw.decode("utf-8")
    if ext == "json":
        obj = json.loads(text)
        text = next((obj[c] for c in PROMPT_COLUMNS if isinstance(obj.get(c), str)), None) \
            if isinstance(obj, dict) else None
    prompt, error = _prompt_value(text)
    if error:
        raise ValueError(error)
    return prompt


def _warn(where: str, key: str, ext: str, why: str) -> None:
    from pipeline.members import shown

    log.warning("%s: ignoring unreadable caption member %s.%s (%s)", where, shown(key), ext, why)
