"""The head-score rule ``run`` and ``filter`` share: a quality head's score outside ``min_scores``/``max_scores``
(or not finite) rejects the sample, with the same reason text in either index."""

from __future__ import annotations

import math


def score_reasons(scores: dict[str, float] | None, min_scores: dict[str, float],
                  max_scores: dict[str, float]) -> list[str]:
    """Why head scores miss ``min_scores``/``max_scores`` (a non-finite score always does); shared by ``run``
    and both decision paths of ``filter``."""
    reasons = []
    for name, value in sorted((scores or {}).items()):
        lo, hi = min_scores.get(name), max_scores.get(name)
        if not math.isfinite(value):
            reasons.append(f"score_{name} is not finite")
        elif lo is not None and value < lo:
            reasons.append(f"score_{name} {value:.4f} < min_scores.{name} {lo}")
        elif hi is not None and value > hi:
            reasons.append(f"score_{name} {value:.4f} > max_scores.{name} {hi}")
    return reasons
