"""Peak memory of a whole run (driver + embedded Ray + workers) at 10x samples vs. 1x
(docs/architecture.md §8 target: ratio <= 1.2): streaming must keep memory flat as a run grows.

Memory is the peak over time of the summed PSS (proportional set size) of every process in the run's
session, so pages shared through Ray's object store are counted once, not once per process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import report  # noqa: E402


def session_pss(sid: int) -> int:
    total = 0
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid:
                total += proc.memory_full_info().pss
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return total


def peak_run(seeds_per_pair: int, out: Path) -> tuple[int, float, str]:
    args = [sys.executable, "-m", "jobs.cli", "run", "configs/demo.yaml", "--quiet",
            "--set", f"output.path={out}", "--set", f"pairing.seeds_per_pair={seeds_per_pair}",
            "--set", "scoring.clip_model=tiny:clip", "--set", "output.samples_per_shard=8"]
    t0 = time.time()
    proc = subprocess.Popen(args, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, session_pss(proc.pid))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate(timeout=1200)
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {stdout[-2000:]}")
    return peak, time.time() - t0, stdout.strip().splitlines()[-1]


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    results = {}
    try:
        peak_run(1, root / "warm")  # builds the tiny CLIP model once, outside the measurement
        for scale in (1, 4, 10, 16):
            results[scale] = peak_run(scale, root / f"x{scale}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = results[10][0] / results[1][0]
    scaling = "; ".join(f"{s}x={results[s][2].split()[0]} {results[s][1]:.0f}s {results[s][0] / 2**20:.0f}MiB"
                        for s in sorted(results))
    report("peak memory 10x vs 1x samples", ratio=ratio, target="<= 1.2", ok=ratio <= 1.2,
           what="peak summed PSS of the whole run (driver, Ray, workers)",
           peak_1x_mib=round(results[1][0] / 2**20), peak_10x_mib=round(results[10][0] / 2**20),
           scaling=scaling)


if __name__ == "__main__":
    main()
