"""The semantic dedup pass alone at 10^6: clustered (k-means + the rule per cluster) on 10^6 synthetic 512-d
embeddings with planted near-duplicate groups; wall time, and recall / precision of the dropped set against the
exact greedy rule. The exact rule is O(n^2) (hours at 10^6 on 2 cores), so its result at 10^6 is the planted
answer (all but the best-scored sample of each group); the benchmark first checks, on a 2*10^4 subset, that the
exact rule gives exactly the planted answer on this data. Also the exact rule's own time at 2*10^4 and 4*10^4,
for its quadratic slope. Embeddings lie around 1,000 centres (real CLIP embeddings are clustered); the recall on
unstructured random vectors is reported as a figure too.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import report  # noqa: E402
from pipeline.filter import dedup as dedup  # noqa: E402
from tests.dedup_data import expected_drops, planted  # noqa: E402

N = 1_000_000
THRESHOLD = 0.95


def _recall_precision(found: set[str], truth: set[str]) -> tuple[float, float]:
    hit = len(found & truth)
    return hit / max(1, len(truth)), hit / max(1, len(found))


def main() -> None:
    exact_s = {}
    for n in (20_000, 40_000):
        keys, emb, scores, groups = planted(n, groups=n // 100, group_size=3, seed=n, centers=20)
        t0 = time.perf_counter()
        exact = dedup.near_duplicates(keys, emb, scores, THRESHOLD)
        exact_s[n] = time.perf_counter() - t0
        assert set(exact) == expected_drops(scores, groups), "the planted answer is not the exact rule's here"
    keys, emb, scores, groups = planted(N, groups=10_000, group_size=3, seed=1, centers=1000)
    truth = expected_drops(scores, groups)
    t0 = time.perf_counter()
    found = set(dedup.clustered_near_duplicates(keys, emb, scores, THRESHOLD))
    seconds = time.perf_counter() - t0
    recall, precision = _recall_precision(found, truth)
    keys, emb, scores, groups = planted(200_000, groups=2_000, group_size=3, seed=2)  # no structure
    flat_recall, flat_precision = _recall_precision(set(dedup.clustered_near_duplicates(keys, emb, scores,
                                                                                        THRESHOLD)),
                                                    expected_drops(scores, groups))
    quadratic_1e6_h = exact_s[40_000] * (N / 40_000) ** 2 / 3600
    ratio = min(recall, precision)
    report("semantic dedup, clustered, 1e6 x 512-d: recall/precision vs the exact rule", ratio=ratio,
           target=">= 0.98", ok=ratio >= 0.98, what="min(recall, precision) of the dropped set",
           recall=round(recall, 4), precision=round(precision, 4), clustered_seconds=round(seconds, 1),
           clusters=dedup.cluster_count(N), planted_drops=len(truth),
           exact_seconds_2e4=round(exact_s[20_000], 1), exact_seconds_4e4=round(exact_s[40_000], 1),
           exact_projected_hours_1e6=round(quadratic_1e6_h, 1),
           unstructured_2e5_recall=round(flat_recall, 4), unstructured_2e5_precision=round(flat_precision, 4))
    speed = quadratic_1e6_h * 3600 / seconds
    report("semantic dedup, clustered vs exact at 1e6: speed-up", ratio=speed, target=">= 10", ok=speed >= 10,
           what="projected exact time / measured clustered time (both on this machine)",
           clustered_minutes=round(seconds / 60, 1), exact_projected_hours=round(quadratic_1e6_h, 1))


if __name__ == "__main__":
    main()
