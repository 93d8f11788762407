"""Helpers for ratio benchmarks: timing with warm-up and medians, and the one-line JSON result format
that ``run_all.py`` collects into ``results.json`` and the README table."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


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


def child_result(script: str, *args: str, timeout: int = 1800) -> dict:
    """Run ``script --child ARGS`` in its own process (its own peak RSS) and return its ``RESULT {json}`` line."""
    proc = subprocess.run([sys.executable, script, "--child", *args], cwd=Path(script).resolve().parents[1],
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed: {proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> float:
    """Reset this process's peak RSS to its current RSS (Linux ``clear_refs`` 5); return the current RSS."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return status_mib("VmRSS")
