"""``stylegen filter`` at corpus scale: the driver's own peak RSS and the wall time per sample of a whole filter
run (listing, CLIP embedding with ``tiny:clip``, decisions, writing) over 2e4 and 2e5 small captioned images.
Targets (issue 14): driver peak RSS 2e5/2e4 <= 1.3, time per sample at 2e5 <= 1.5x that at 2e4. The 2e4 pool is
decided by one worker, the 2e5 pool (above ``SMALL_POOL``) in stages across the cluster; both with exact and
clustered dedup and ``top_fraction``. Each size runs in its own process; its peak RSS is that process's own
``VmHWM``, reset (``/proc/self/clear_refs``) after imports and Ray start-up; Ray's processes are not the driver.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import child_result, report, reset_peak, status_mib  # noqa: E402

SIZES = (20_000, 200_000)
PER_TAR = 1_000
WORDS = ("a red fox", "an old map of the sea", "two cats asleep", "a blue door", "a tower at dusk", "waves")


def _corpus(root: Path, n: int) -> None:
    """``n`` 12x12 PNG images with captions, ``PER_TAR`` per tar; every 50th image repeats an earlier one."""
    import torch
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    root.mkdir(parents=True)
    for t in range(n // PER_TAR):
        pixels = torch.randint(0, 256, (PER_TAR, 12, 12, 3), generator=gen, dtype=torch.uint8).numpy()
        with tarfile.open(root / f"part-{t:05d}.tar", "w") as tar:
            for i in range(PER_TAR):
                buf = io.BytesIO()
                Image.fromarray(pixels[i - 1 if i % 50 == 49 else i]).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", WORDS[(t + i) % len(WORDS)].encode())):
                    info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def child(root: str, n: int) -> None:
    """One filter run in this process: prints {seconds, rss_mib, start_mib, planned, kept}."""
    from pipeline.config import FilterRunConfig, validate_config
    from pipeline.filter.run import curate
    from pipeline.session import init_ray

    cfg = validate_config({
        "input": {"shards": f"{root}/corpus-{n}/part-*.tar"},
        "output": {"path": f"{root}/out-{n}", "samples_per_shard": 1000},
        "scoring": {"clip_model": "tiny:clip", "batch_size": 512},
        "filter": {"dedup_exact": True, "dedup_threshold": 0.999, "top_fraction": 0.5},
    }, schema=FilterRunConfig)
    init_ray(None, quiet=True)
    start_mib = reset_peak()
    t0 = time.perf_counter()
    summary = curate(cfg, quiet=True)
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({"seconds": seconds, "rss_mib": status_mib("VmHWM"), "start_mib": start_mib,
                                  "planned": summary.planned, "kept": summary.kept}))


def _measure(root: Path, n: int) -> dict:
    return child_result(__file__, str(root), str(n), timeout=3600)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-filter-"))
    for n in SIZES:
        _corpus(root / f"corpus-{n}", n)
    r = {n: _measure(root, n) for n in SIZES}
    small, large = SIZES
    for n in SIZES:
        assert r[n]["planned"] == n and 0 < r[n]["kept"] <= n // 2 + 1, r[n]
    rss = r[large]["rss_mib"] / r[small]["rss_mib"]
    per_sample = (r[large]["seconds"] / large) / (r[small]["seconds"] / small)
    figures = {f"filter_{n:.0e}": f"{v['seconds']:.1f}s peak {v['rss_mib']:.0f}MiB "
                                  f"(+{v['rss_mib'] - v['start_mib']:.0f})" for n, v in r.items()}
    report("filter: driver peak RSS 2e5 vs 2e4 samples", ratio=rss, target="<= 1.3", ok=rss <= 1.3,
           what="peak RSS of the driver process over a whole filter run (tiny:clip, exact + clustered dedup, "
                "top_fraction)", **figures)
    report("filter: time per sample 2e5 vs 2e4", ratio=per_sample, target="<= 1.5", ok=per_sample <= 1.5,
           what="wall time of a whole filter run per input sample (Ray already running)",
           samples_per_s={f"{n:.0e}": round(n / v["seconds"]) for n, v in r.items()})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
