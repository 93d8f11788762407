"""Semantic near-duplicate removal for ``stylegen filter``, by image-embedding cosine.

The rule (both methods): walk the samples from the best CLIP score down (ties by key) and drop one whose cosine
with an already kept sample is >= ``threshold``; it names the kept sample of highest cosine as its twin.

- ``greedy`` applies the rule to the whole pool: exact, O(n^2) dot products (as BLAS products in row blocks, so
  only pairs above the threshold are held), practical to ~10^5 samples.
- ``clustered`` (SemDeDup, Abbas et al. 2023, as NeMo Curator does it): spherical k-means (faiss) on a keyed
  sample of the embeddings, every embedding assigned to its nearest centroid, then the rule within each cluster.
  Cost ~ n * (cluster size) instead of n^2. The trade-off is recall: a near-duplicate pair whose members fall in
  different clusters is not found. Pairs above a high threshold (0.9+) are close on the sphere and nearly always
  share their nearest centroid; the benchmark measures recall and precision against the exact rule.
  Cluster count: ``ceil(n / CLUSTER_SIZE)`` (about 1,000 samples per cluster), capped at ``MAX_CLUSTERS``.

Deterministic: the training sample is chosen by a seeded hash of each key (:func:`training_mask`), faiss is
seeded, inputs are sorted by key first, so a resumed run decides the same, in one worker or across the cluster
(``pipeline.filter.decide``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np

CLUSTER_SIZE = 1_000
MAX_CLUSTERS = 50_000
TRAIN_PER_CLUSTER = 64  # k-means training points per centroid (faiss warns below 39)
BLOCK_ELEMENTS = 1 << 24  # similarities computed per product (64 MiB of float32)


def near_duplicates(keys: list[str], embeddings: np.ndarray, scores: Mapping[str, float],
                    threshold: float) -> dict[str, tuple[str, float]]:
    """The exact rule over all ``keys`` (``embeddings`` L2-normalised, one row per key): ``{dropped: (twin,
    cosine)}``."""
    n = len(keys)
    if n < 2:
        return {}
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    order = sorted(range(n), key=lambda i: (-_score(scores, keys[i]), keys[i]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    earlier: list[list[tuple[int, float]]] = [[] for _ in range(n)]  # neighbours above threshold ranked before
    block = max(1, BLOCK_ELEMENTS // n)
    for start in range(0, n, block):
        sims = emb[start:start + block] @ emb.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + r
            if rank[c] < rank[i]:
                earlier[i].append((c, float(sims[r, c])))
    kept = np.zeros(n, dtype=bool)
    dropped: dict[str, tuple[str, float]] = {}
    for i in order:
        twins = [(cos, -rank[j], j) for j, cos in earlier[i] if kept[j]]
        if twins:
            cos, _, j = max(twins)  # highest cosine; on a tie the better-ranked kept sample
            dropped[keys[i]] = (keys[j], cos)
        else:
            kept[i] = True
    return dropped


def exact_duplicates(keys: list[str], hashes: list[str | None], scores: Mapping[str, float]) -> dict[str, str]:
    """Byte-identical payloads (equal ``hashes``; None is never a duplicate): walking from the best score down
    (ties by key), every sample whose hash an earlier one had is dropped, naming that one: ``{dropped: twin}``."""
    best: dict[str, str] = {}
    dropped: dict[str, str] = {}
    for key, digest in sorted(zip(keys, hashes, strict=True), key=lambda kh: (-_score(scores, kh[0]), kh[0])):
        if digest is None:
            continue
        if digest in best:
            dropped[key] = best[digest]
        else:
            best[digest] = key
    return dropped


def cluster_count(n: int) -> int:
    return max(1, min(MAX_CLUSTERS, math.ceil(n / CLUSTER_SIZE)))


def training_mask(keys: list[str], fraction: float, seed: int = 0) -> np.ndarray:
    """Which rows train k-means: a seeded hash of each key below ``fraction``. Decided from the key alone (not a
    draw over the whole pool) so that every worker picks the same sample from its own rows, however the pool is
    partitioned; written by hand because no library offers a partition-independent keyed sample."""
    if fraction >= 1:
        return np.ones(len(keys), dtype=bool)
    salt = f"{seed}:".encode()
    draws = np.array([int.from_bytes(hashlib.blake2b(salt + k.encode(), digest_size=8).digest(), "big") >> 11
                      for k in keys], dtype=np.float64) / float(1 << 53)
    return draws < fraction


def train_centroids(train: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means (faiss, on a GPU where a GPU build of faiss sees one) on ``train`` (rows in key order);
    the centroids, one row each."""
    import faiss

    train = np.ascontiguousarray(train, dtype=np.float32)
    gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    kmeans = faiss.Kmeans(train.shape[1], n_clusters, niter=20, seed=seed, spherical=True, verbose=False, gpu=gpu)
    kmeans.train(train)
    return kmeans.centroids.copy()


def nearest_centroid(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (highest inner product) of every row, in row blocks."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    block = max(1, BLOCK_ELEMENTS // max(1, len(centroids)))
    return np.concatenate([np.argmax(emb[i:i + block] @ centroids.T, axis=1) for i in range(0, len(emb), block)]
                          or [np.zeros(0, dtype=np.int64)]).astype(np.int64)


def cluster_assignments(keys: list[str], embeddings: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """Nearest centroid of every row after spherical k-means on the keyed sample of about ``TRAIN_PER_CLUSTER``
    rows per centroid (``keys`` sorted)."""
    n = len(keys)
    if n_clusters <= 1 or n <= n_clusters:
        return np.zeros(n, dtype=np.int64)
    mask = training_mask(keys, min(n, n_clusters * TRAIN_PER_CLUSTER) / n, seed)
    train = np.asarray(embeddings, dtype=np.float32)[mask]
    return nearest_centroid(embeddings, train_centroids(train, min(n_clusters, len(train)), seed))


def clustered_near_duplicates(keys: list[str], embeddings: np.ndarray, scores: Mapping[str, float],
                              threshold: float, *, seed: int = 0,
                              n_clusters: int | None = None) -> dict[str, tuple[str, float]]:
    """The rule within each k-means cluster (see the module docstring)."""
    order = np.argsort(np.asarray(keys, dtype=object), kind="stable")  # inputs sorted by key: determinism
    keys = [keys[i] for i in order]
    emb = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32)[order])
    assign = cluster_assignments(keys, emb, n_clusters or cluster_count(len(keys)), seed)
    dropped: dict[str, tuple[str, float]] = {}
    by_cluster = np.argsort(assign, kind="stable")
    bounds = np.flatnonzero(np.diff(assign[by_cluster])) + 1
    for members in np.split(by_cluster, bounds):
        if len(members) > 1:
            dropped.update(near_duplicates([keys[i] for i in members], emb[members], scores, threshold))
    return dropped


def _score(scores: Mapping[str, float], key: str) -> float:
    value = scores.get(key)
    return value if value is not None and math.isfinite(value) else -math.inf
