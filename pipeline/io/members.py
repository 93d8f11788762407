"""Tar member names of stylegen's outputs, and which members of a foreign sample ``stylegen filter`` keeps.

Foreign tars are data, never names: an output member is always ``<key>.<ext>`` with a 16-hex key that stylegen
derived itself and a short, portable, lower-case extension. A foreign sample's member names (``__key__``,
``__url__``, a 120-character extension, ``x/../../p``) never reach the tar writer.

``filter`` keeps only what it screened (docs/architecture.md §10): the one image member the embedder decoded
and scored (the first of ``IMAGE_EXTS`` present, the rules NSFW/aesthetic/dedup judged), and the small text
members that describe it (``txt``, ``json``, ``cls``). Every other member (a second, unscreened image, reserved
``__*__`` names, unknown or unsafe extensions) is dropped; the sample's index ``meta`` lists them under
``dropped``.
"""

from __future__ import annotations

import re

# Extensions an output may hold: dot-separated lower-case words (``jpg``, ``style.png``), no leading ``_`` or
# ``-`` (so no reserved WebDataset ``__key__``), at most MAX_EXT_CHARS characters.
MAX_EXT_CHARS = 32
_EXT_RE = re.compile(r"[a-z0-9][a-z0-9_-]*(?:\.[a-z0-9][a-z0-9_-]*)*")
_KEY_RE = re.compile(r"[0-9a-f]{16}")
# The members of a foreign sample kept beside its screened image: its caption and label, text only.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")  # in this order: the first is the image
TEXT_EXTS = ("txt", "json", "cls")
SHOWN_CHARS = 64  # a foreign member name recorded in the index is cut to this many characters


def portable_ext(ext: str) -> bool:
    """True for an extension stylegen may write (see ``_EXT_RE``)."""
    return len(ext) <= MAX_EXT_CHARS and _EXT_RE.fullmatch(ext) is not None


def output_name_problem(name: str) -> str | None:
    """Why ``name`` is not an output member name ``<16 hex>.<portable ext>`` (None when it is one)."""
    key, dot, ext = name.partition(".")
    if not dot or _KEY_RE.fullmatch(key) is None:
        return "not <16 hex key>.<ext>"
    if not portable_ext(ext):
        return f"extension is not short and portable ([a-z0-9_-] words, at most {MAX_EXT_CHARS} characters)"
    return None


def check_output_member(key: str, ext: str) -> None:
    """Refuse (ValueError) a member name the writer must never produce; the last guard before ``tarfile``."""
    why = output_name_problem(f"{key}.{ext}")
    if why:
        raise ValueError(f"refusing to write tar member {shown(f'{key}.{ext}')!r}: {why}")


def screened_image(members: dict) -> str | None:
    """The image member ``filter`` decodes, scores and screens: the first of ``IMAGE_EXTS`` the sample has."""
    return next((e for e in IMAGE_EXTS if e in members), None)


def kept_members(members: dict) -> tuple[list[str], list[str]]:
    """(kept, dropped) extensions of a foreign sample: the screened image and its text members are kept."""
    image = screened_image(members)
    kept = sorted(e for e in members if e == image or e in TEXT_EXTS)
    return kept, sorted(e for e in members if e not in kept)


def shown(name: str) -> str:
    """A foreign name as recorded in the index or a message: at most SHOWN_CHARS characters."""
    return name if len(name) <= SHOWN_CHARS else name[:SHOWN_CHARS - 3] + "..."
