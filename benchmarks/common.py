"""Helpers for ratio benchmarks: timing with warm-up and medians, and the one-line JSON result format
that ``run_all.py`` collects into ``results.json`` and the README table."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(name: str, *, ratio: float, target: str, ok: bool, what: str, **figures) -> dict:
    """Print the result as one JSON line (prefixed so run_all.py can find it) and return it."""
    result = {"name": name, "what": what, "ratio": round(ratio, 4), "target": target, "ok": bool(ok),
              "figures": figures, "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    print("BENCH " + json.dumps(result, sort_keys=True), flush=True)
    return result
