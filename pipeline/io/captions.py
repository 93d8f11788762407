"""The one reader of a WebDataset sample's caption (``txt`` or ``json`` member), for ``run`` and ``filter``.

A caption is data from someone else's tar: at most ``MAX_CAPTION_BYTES`` are read, control characters are
stripped and the length capped (:func:`prompt_value`, for manifests and prompt lists too). A member that is too
big, not UTF-8, malformed or absurdly nested JSON (10^5 levels: a RecursionError) costs one warning and the
caption, never the sample, the tar or the run.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable

from pipeline.io.members import shown

log = logging.getLogger(__name__)

MAX_CAPTION_BYTES = 1_000_000  # a caption member larger than this is not read at all
CAPTION_EXTS = ("txt", "json")  # in this order: the first that yields a caption wins
PROMPT_COLUMNS = ("prompt", "caption", "text")  # a manifest column that holds the prompt

# Longer prompts are refused (failed rows): far beyond any text encoder's context, and carried in every row.
MAX_PROMPT_CHARS = 20_000
# C0 and C1 control characters and DEL, except tab and newline (kept: they are layout, not control).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_prompt(text: str) -> str:
    """Strip C0/C1 control characters (except newline and tab) and surrounding whitespace.

    ``\r\n`` becomes ``\n``. Everything else (CJK, emoji, zero-width joiners) is kept unchanged.
    """
    return _CONTROL_RE.sub("", text).strip()


def prompt_value(value: object) -> tuple[str | None, str | None]:
    """A manifest/caption prompt value as ``(prompt, error)``: cleaned text, None when empty."""
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None, f"prompt is not text ({type(value).__name__})"
    text = clean_prompt(str(value))
    if len(text) > MAX_PROMPT_CHARS:
        return None, f"prompt too long: {len(text)} characters (max {MAX_PROMPT_CHARS})"
    return text or None, None


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

    text = raw.decode("utf-8")
    if ext == "json":
        obj = json.loads(text)
        text = next((obj[c] for c in PROMPT_COLUMNS if isinstance(obj.get(c), str)), None) \
            if isinstance(obj, dict) else None
    prompt, error = prompt_value(text)
    if error:
        raise ValueError(error)
    return prompt


def _warn(where: str, key: str, ext: str, why: str) -> None:

    log.warning("%s: ignoring unreadable caption member %s.%s (%s)", where, shown(key), ext, why)
