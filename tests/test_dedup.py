"""Semantic dedup: the blocked exact rule equals the plain greedy loop; the clustered (k-means) rule finds the same
near-duplicates on well-separated data, deterministically and regardless of input order."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from pipeline.filter import dedup as dedup
from tests.dedup_data import expected_drops, planted


def reference_greedy(keys, emb, scores, threshold):
    """The rule as a plain loop over kept samples (the implementation stylegen shipped before pipeline.filter.dedup)."""
    order = sorted(range(len(keys)), key=lambda i: (-scores.get(keys[i], -math.inf), keys[i]))
    kept, kept_keys, dropped = [], [], {}
    for i in order:
        if kept:
            sims = np.asarray(kept) @ emb[i]
            j = int(np.argmax(sims))
            if sims[j] >= threshold:
                dropped[keys[i]] = kept_keys[j]
                continue
        kept.append(emb[i])
        kept_keys.append(keys[i])
    return dropped


@pytest.mark.parametrize("block", [1 << 24, 3 * 64])  # one product, and many blocks of three rows
def test_exact_rule_equals_the_greedy_loop(monkeypatch, block):
    monkeypatch.setattr(dedup, "BLOCK_ELEMENTS", block)
    keys, emb, scores, _ = planted(400, dim=32, groups=30, group_size=3, noise=0.15, seed=3)
    del scores[keys[5]]  # a sample without a score goes last
    for threshold in (0.8, 0.9, 0.97):
        got = dedup.near_duplicates(keys, emb, scores, threshold)
        assert {k: twin for k, (twin, _) in got.items()} == reference_greedy(keys, emb, scores, threshold)
        assert all(cos >= threshold for _, cos in got.values())


def test_clustered_rule_finds_the_planted_groups_like_the_exact_rule():
    keys, emb, scores, groups = planted(6000, dim=64, groups=120, group_size=4, noise=0.02, seed=1, centers=6)
    exact = dedup.near_duplicates(keys, emb, scores, 0.9)
    assert set(exact) == expected_drops(scores, groups)
    clustered = dedup.clustered_near_duplicates(keys, emb, scores, 0.9, n_clusters=6)
    # Same drops and twins; the reported cosine comes from a product over another subset of rows, so its float32
    # rounding may differ by an ulp or two (it does on AMD EPYC, not on the Intel Xeon CI ran on before).
    assert {k: twin for k, (twin, _) in clustered.items()} == {k: twin for k, (twin, _) in exact.items()}
    assert max(abs(clustered[k][1] - cos) for k, (_, cos) in exact.items()) <= 1e-5


def test_clustered_rule_is_deterministic_and_independent_of_input_order():
    keys, emb, scores, _ = planted(3000, dim=32, groups=200, group_size=3, noise=0.3, seed=2)
    first = dedup.clustered_near_duplicates(keys, emb, scores, 0.8, n_clusters=5)
    assert first == dedup.clustered_near_duplicates(keys, emb, scores, 0.8, n_clusters=5)
    perm = list(range(len(keys)))
    random.Random(0).shuffle(perm)
    shuffled = dedup.clustered_near_duplicates([keys[i] for i in perm], emb[perm], scores, 0.8, n_clusters=5)
    assert shuffled == first
    assert first  # noisy groups at 0.8: some pairs are found, so the comparison is not vacuous


def test_cluster_count_rule():
    assert [dedup.cluster_count(n) for n in (1, 999, 1000, 1001, 10**6, 10**9)] == [1, 1, 1, 2, 1000, 50_000]


def test_filter_hash_of_outputs_made_before_dedup_method_is_unchanged(tmp_path):
    from pipeline.config import FilterRunConfig, validate_config

    def cfg(**f):
        return validate_config({"input": {"shards": "x/*.tar"}, "output": {"path": str(tmp_path)}, "filter": f},
                               schema=FilterRunConfig)

    # Recorded with stylegen before dedup_method existed (greedy was the only rule).
    assert cfg().filter_hash() == cfg(dedup_method="greedy").filter_hash() == "95b621eb64dacbf3"
    assert cfg(dedup_method="clustered").filter_hash() == "95b621eb64dacbf3"  # no dedup: the method is moot
    assert cfg(dedup_threshold=0.95, dedup_method="greedy").filter_hash() == "c3d5cba9c75a2bc2"
    assert cfg(dedup_threshold=0.95).filter_hash() != "c3d5cba9c75a2bc2"  # clustered decides differently
