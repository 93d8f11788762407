"""Corpus-level selection for ``stylegen filter``: pure functions from persisted scores and embeddings to a
decision per sample. Everything here is deterministic (ties broken by key), so a resumed run re-derives
exactly the decisions of the run it resumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Candidate:
    key: str
    clip: float | None
    width: int | None
    height: int | None
    caption_chars: int | None
    error: str | None = None


def top_fraction_keys(scores: dict[str, float], fraction: float) -> set[str]:
    """The best ``round(fraction * n)`` keys of the whole pool (DataComp-style: the cut-off comes from the
    full score distribution, not from a fixed threshold)."""
    keep = int(math.floor(fraction * len(scores) + 0.5))
    ranked = sorted(scores, key=lambda k: (-scores[k], k))
    return set(ranked[:keep])


def basic_reason(c: Candidate, *, min_side: int | None, max_aspect: float | None, min_caption_chars: int | None,
                 max_caption_chars: int | None) -> str | None:
    """Why a sample fails the cheap checks (size, aspect ratio, caption length), or None."""
    reasons = []
    if min_side is not None and c.width is not None and min(c.width, c.height) < min_side:
        reasons.append(f"min side {min(c.width, c.height)} < {min_side}")
    if max_aspect is not None and c.width and c.height:
        aspect = max(c.width, c.height) / min(c.width, c.height)
        if aspect > max_aspect:
            reasons.append(f"aspect ratio {aspect:.2f} > {max_aspect}")
    chars = c.caption_chars or 0
    if min_caption_chars is not None and chars < min_caption_chars:
        reasons.append(f"caption {chars} chars < {min_caption_chars}")
    if max_caption_chars is not None and chars > max_caption_chars:
        reasons.append(f"caption {chars} chars > {max_caption_chars}")
    return "; ".join(reasons) or None
