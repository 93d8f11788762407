"""Corpus-level selection for ``stylegen filter``: pure functions from persisted scores and embeddings to a
decision per sample. Everything here is deterministic (ties broken by key), so a resumed run re-derives
exactly the decisions of the run it resumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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


def near_duplicates(keys: list[str], embeddings: np.ndarray, scores: dict[str, float],
                    threshold: float) -> dict[str, tuple[str, float]]:
    """Greedy near-duplicate removal by image-embedding cosine: walk samples from the best CLIP score down and
    drop one whose cosine with an already kept sample is >= threshold. Returns ``{dropped: (kept, cosine)}``.

    Embeddings must be L2-normalised. Cost is O(n * kept) dot products; fine up to a few hundred thousand
    samples per run (an approximate-nearest-neighbour index would be the next step beyond that).
    """
    order = sorted(range(len(keys)), key=lambda i: (-scores.get(keys[i], -math.inf), keys[i]))
    kept = np.empty_like(embeddings, dtype=np.float32)
    kept_keys: list[str] = []
    dropped: dict[str, tuple[str, float]] = {}
    for i in order:
        if kept_keys:
            sims = kept[: len(kept_keys)] @ embeddings[i]
            j = int(np.argmax(sims))
            if sims[j] >= threshold:
                dropped[keys[i]] = (kept_keys[j], float(sims[j]))
                continue
        kept[len(kept_keys)] = embeddings[i]
        kept_keys.append(keys[i])
    return dropped


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
