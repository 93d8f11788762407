"""Synthetic image embeddings with planted near-duplicate groups, for the dedup tests and benchmark."""

from __future__ import annotations

import numpy as np
import torch


def planted(n: int, dim: int = 512, groups: int = 100, group_size: int = 4, noise: float = 0.01,
            seed: int = 0, centers: int = 0) -> tuple[list[str], np.ndarray, dict[str, float], list[list[str]]]:
    """``n`` L2-normalised random embeddings of which ``groups`` groups of ``group_size`` are near-copies of one
    vector (cosine ~ 1 - noise^2 * dim / 2); random pairs have cosine ~ N(0, 1/dim). With ``centers``, the
    vectors lie around that many far-apart centres (real embeddings have such structure). Returns keys,
    embeddings, CLIP scores and the planted groups (keys)."""
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=gen)
    if centers:
        middle = torch.randn(centers, dim, generator=gen)  # cosine within a centre ~ 0.5, across ~ 0
        emb = emb + middle[torch.randint(centers, (n,), generator=gen)]
    planted_rows = torch.randperm(n, generator=gen)[: groups * group_size].view(groups, group_size)
    for rows in planted_rows:
        emb[rows] = emb[rows[0]] + noise * torch.randn(group_size, dim, generator=gen)
    emb = torch.nn.functional.normalize(emb, dim=1).numpy().astype(np.float32)
    keys = [f"{i:08x}" for i in range(n)]
    score_values = torch.rand(n, generator=gen).tolist()
    scores = dict(zip(keys, score_values, strict=True))
    return keys, emb, scores, [[keys[r] for r in rows.tolist()] for rows in planted_rows]


def expected_drops(scores: dict[str, float], groups: list[list[str]]) -> set[str]:
    """What the exact rule drops when groups are tight and far apart: all but the best of each group."""
    drops = set()
    for group in groups:
        best = min(group, key=lambda k: (-scores[k], k))
        drops.update(k for k in group if k != best)
    return drops
