"""Planning at corpus scale: the driver's own peak RSS and wall time for a plan of 1e5 and 1e6 samples (a prompts
file x 1,000 styles) built on Ray, and for a resume of 1e6 where 90% of the keys are already indexed (worker-side
lookup and Ray's hash join), side by side with the in-driver reference planner (``build_plan`` plus a set of done
keys, what ``run`` did before). Targets (issue 13): driver peak RSS 1e6/1e5 <= 1.3, time per sample at 1e6 <= 1.2x
that at 1e5. Each measurement runs in its own process; its peak RSS is that process's own ``VmHWM``, reset (through
``/proc/self/clear_refs``) after imports and Ray start-up, so the import peak (torch) does not hide the planning's;
Ray's own processes are not the driver. Ray is started before the clock starts, as a cluster would already run.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import child_result, report, reset_peak, status_mib  # noqa: E402

STYLES = 1000
SIZES = (100_000, 1_000_000)


def _config(root: Path, n: int, out: str):
    from pipeline.config import validate_config

    return validate_config({
        "output": {"path": str(root / out), "samples_per_shard": 1000},
        "content": {"prompts": str(root / f"prompts-{n}.txt")},
        "style": {"images": str(root / "styles")},
        "pairing": {"styles_per_content": STYLES},
        "operator": {"name": "color-transfer"},
    })


def _corpus(root: Path) -> None:
    from tests.unit_helpers import solid_png

    (root / "styles").mkdir(parents=True)
    for i in range(STYLES):
        (root / "styles" / f"{i:04d}.png").write_bytes(solid_png((i % 256, (i * 7) % 256, (i * 13) % 256)))
    for n in SIZES:
        (root / f"prompts-{n}.txt").write_text("".join(f"prompt number {i} of a corpus\n" for i in range(n // STYLES)))


def _prefill(root: Path, n: int) -> int:
    """Index files holding 90% of the 1e6 plan's keys (1,000 rows each), as rejected rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.plan.keys import build_plan
    from pipeline.schema import INDEX_SCHEMA

    keys = [s.key for i, s in enumerate(build_plan(_config(root, n, "out-resume"))) if i % 10]
    index = root / "out-resume" / "index"
    index.mkdir(parents=True)
    for f, start in enumerate(range(0, len(keys), 1000)):
        part = keys[start:start + 1000]
        cols = {fld.name: pa.nulls(len(part), fld.type) for fld in INDEX_SCHEMA}
        cols["key"] = pa.array(part, pa.string())
        cols["status"] = pa.array(["rejected"] * len(part), pa.string())
        pq.write_table(pa.table(cols, schema=INDEX_SCHEMA), index / f"{f:016x}.parquet")
    return len(keys)


def child(mode: str, root: str, n: int) -> None:
    """One measurement in this process: prints {seconds, rss_mib, planned, todo}."""
    root_path = Path(root)
    out = "out-resume" if "resume" in mode else f"out-{mode}-{n}"
    cfg = _config(root_path, n, out)
    if mode.startswith("driver"):
        from pipeline.output.store import OutputStore
        from pipeline.plan.keys import build_plan

        start_mib = reset_peak()
        t0 = time.perf_counter()
        plan = build_plan(cfg)
        done = OutputStore(cfg.output.path).done_keys()
        todo = [s for s in plan if s.key not in done]
        seconds, planned, n_todo = time.perf_counter() - t0, len(plan), len(todo)
    else:
        from pipeline.generate.run import plan_only
        from pipeline.output import resume as resume
        from pipeline.session import init_ray

        if mode == "resume-join":
            resume.BROADCAST_KEYS = 0
        init_ray(None, quiet=True)
        start_mib = reset_peak()
        t0 = time.perf_counter()
        summary = plan_only(cfg, quiet=True)
        seconds, planned, n_todo = time.perf_counter() - t0, summary.planned, summary.todo
    rss_mib = status_mib("VmHWM")
    print("RESULT " + json.dumps({"seconds": seconds, "rss_mib": rss_mib, "start_mib": start_mib,
                                  "planned": planned, "todo": n_todo}))


def _measure(mode: str, root: Path, n: int) -> dict:
    return child_result(__file__, mode, str(root), str(n))


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    _corpus(root)
    small, large = SIZES
    done = _prefill(root, large)
    r = {(mode, n): _measure(mode, root, n) for mode in ("cluster", "driver") for n in SIZES}
    for mode in ("resume-lookup", "resume-join", "driver-resume"):
        r[(mode, large)] = _measure(mode, root, large)
        assert r[(mode, large)]["todo"] == large - done, r[(mode, large)]
    for n in SIZES:
        assert r[("cluster", n)]["planned"] == r[("driver", n)]["planned"] == n
    c5, c6 = r[("cluster", small)], r[("cluster", large)]
    d5, d6 = r[("driver", small)], r[("driver", large)]
    rss_ratio = c6["rss_mib"] / c5["rss_mib"]
    per_sample = (c6["seconds"] / large) / (c5["seconds"] / small)
    slope = (c6["seconds"] - c5["seconds"]) / (large - small)
    projected_1e8_min = (c6["seconds"] + slope * (10**8 - large)) / 60
    figures = {f"{mode}_{n:.0e}": f"{v['seconds']:.1f}s peak {v['rss_mib']:.0f}MiB "
                                  f"(+{v['rss_mib'] - v['start_mib']:.0f})" for (mode, n), v in r.items()}
    report("plan on Ray: driver peak RSS 1e6 vs 1e5 samples", ratio=rss_ratio, target="<= 1.3",
           ok=rss_ratio <= 1.3, what="peak RSS of the driver process, a prompts file x 1,000 styles",
           driver_reference_rss_ratio=round(d6["rss_mib"] / d5["rss_mib"], 3), **figures)
    report("plan on Ray: time per sample 1e6 vs 1e5", ratio=per_sample, target="<= 1.2", ok=per_sample <= 1.2,
           what="wall time of the plan per planned sample (Ray already running)",
           projected_1e8_minutes_on_2_cores=round(projected_1e8_min, 1),
           driver_reference_per_sample_ratio=round((d6["seconds"] / large) / (d5["seconds"] / small), 3))
    for mode in ("resume-lookup", "resume-join"):
        v = r[(mode, large)]
        ratio = v["rss_mib"] / c5["rss_mib"]
        report(f"{mode.replace('-', ' (')}): driver peak RSS, 1e6 with 90% done vs plan of 1e5", ratio=ratio,
               target="<= 1.3", ok=ratio <= 1.3, what="peak RSS of the driver, the done keys stay on workers",
               seconds=round(v["seconds"], 1), rss_mib=round(v["rss_mib"]),
               driver_reference_resume=figures["driver-resume_1e+06"])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
