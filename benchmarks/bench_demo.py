"""The first run a user makes: ``stylegen run configs/demo.yaml`` (12 samples, embedded Ray) against what any Ray
program pays first, a fresh process that imports Ray, starts a local Ray and shuts it down (issue 30: a small run
should cost little more than Ray's own start-up).

Both are timed as fresh processes, alternately, on the same machine in one run (warm install, warm file cache);
the demo writes to a new temporary output each time. The ratio is Ray's start-up over the demo's wall time: 1.0
would be a demo that costs nothing beyond starting Ray. The run's own timings (plan, execute) are reported beside.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RAY_START = ("import os, ray; ray.init(address='local', num_cpus=max(4, os.cpu_count() or 1), "
             "include_dashboard=False, log_to_driver=False); ray.shutdown()")
TARGET = 0.25


def _timed(args: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{args[1:4]} failed: {proc.stderr[-2000:]}")
    return elapsed, proc.stdout


def main(repeats: int = 3) -> None:
    ray_s, demo_s, plan_s, execute_s = [], [], [], []
    for _ in range(repeats):
        ray_s.append(_timed([sys.executable, "-c", RAY_START])[0])
        with tempfile.TemporaryDirectory() as tmp:
            elapsed, out = _timed([sys.executable, "-m", "jobs.cli", "run", "configs/demo.yaml", "--quiet", "--json",
                                   "--set", f"output.path={tmp}/demo"])
        summary = json.loads(out.strip().splitlines()[-1])
        demo_s.append(elapsed)
        plan_s.append(summary["timings"]["plan_s"])
        execute_s.append(summary["timings"]["execute_s"])
    ray, demo = statistics.median(ray_s), statistics.median(demo_s)
    ratio = ray / demo
    report("demo run vs Ray start-up", ratio=ratio, target=f">= {TARGET}", ok=ratio >= TARGET,
           what="Ray start-up (import, ray.init, shutdown) / `stylegen run configs/demo.yaml` wall time",
           ray_start_s=round(ray, 2), demo_s=round(demo, 2), demo_plan_s=round(statistics.median(plan_s), 2),
           demo_execute_s=round(statistics.median(execute_s), 2), repeats=repeats)


if __name__ == "__main__":
    main()
