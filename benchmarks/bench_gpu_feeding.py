"""Do the stylize actors ever wait for data? Busy fraction of N GPU actors over a whole run (target >= 0.90).

A GPU hour is paid whether the model runs or waits for the next batch, so the pipeline must keep every stylize
actor fed: decode ahead, hand batches out as soon as an actor is free, score and write behind. The stand-in for
the GPU model is ``tests.plugin_ops:TimedHold``: it holds each batch of 4 for 1 s without using the CPU (a
process waiting on its device; 1 s per batch of 4 is the order of an SDXL/Flux style step at 512 px on one
GPU, the case where a fed GPU matters) and records each call's start and end in the sample's ``meta``. The
benchmark reads them back from the index (no side channel) and computes

    busy fraction = sum of the actors' busy time / (N x (last call's end - first call's start))

so Ray start-up and model loading are outside the window, and only gaps between batches count against it.
The whole pipeline runs (decode tasks, stylize actors with ``num_gpus: 1``, tiny:clip scoring, shard writing) on
a real Ray cluster that declares N logical GPUs: one node with 4 (embedded), and two nodes with 2 each
(``tests/cluster.py``: ``ray start`` processes with token auth).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_gpu_feeding.py                      # both rows
    PYTHONPATH=. .venv/bin/python benchmarks/bench_gpu_feeding.py --cluster one-node

On a real GPU cluster, wrap a real operator (it runs on the GPU Ray assigns) and score with ViT-B-32:

    PYTHONPATH=. python benchmarks/bench_gpu_feeding.py --address auto --gpus 8 --scoring ViT-B-32 \\
        --operator '{"name": "sissi", "model": "black-forest-labs/FLUX.1-Fill-dev"}'
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import report  # noqa: E402
from pipeline.config import validate_config  # noqa: E402
from tests.data_paths import samples_dir  # noqa: E402

SAMPLES = 480  # 120 batches of 4: 30 s of held time per actor on 4 actors
BATCH = 4
SECONDS = 1.0
# A GPU actor only waits on its device: a quarter of a logical CPU leaves room for the decode tasks beside it
# (set here so that the benchmark measures feeding, whatever the pools' default num_cpus is).
OPERATOR_CPUS = 0.25


def config(out: Path, gpus: int, *, samples: int = SAMPLES, seconds: float = SECONDS,
           operator: dict | None = None, scoring: str = "tiny:clip"):
    data = samples_dir()
    params = {"seconds": seconds, "size": 64} if operator is None else {"operator": operator}
    return validate_config({
        "output": {"path": str(out), "samples_per_shard": 64},
        "content": {"images": str(data / "content"), "prompts": str(data / "prompts.txt")},
        "style": {"images": str(data / "style")},
        # 14 contents x 12 styles x 3 seeds = 504 pairs, enough for 480 samples
        "pairing": {"styles_per_content": 12, "seeds_per_pair": 3, "limit": samples},
        "decode": {"max_side": 256},
        "operator": {"name": "tests.plugin_ops:TimedHold", "params": params, "batch_size": BATCH,
                     "num_gpus": 1, "num_cpus": OPERATOR_CPUS, "actors": [gpus, gpus]},
        "scoring": {"clip_model": scoring, "clip_pretrained": "none"},
    })


def busy_fraction(output: str, gpus: int) -> dict:
    """The busy fraction of the stylize actors from the index's ``meta`` (one interval per operator call)."""
    from pipeline.output.store import OutputStore

    calls = defaultdict(set)  # worker pid -> {(start, end)}: the samples of one call share its interval
    for text in OutputStore(output).read_index(["meta"]).column("meta").to_pylist():
        meta = json.loads(text) if text else {}
        if "call_start" in meta:
            worker = meta["worker"]
            calls[(worker.get("node"), worker["pid"])].add((meta["call_start"], meta["call_end"]))
    intervals = [i for per_worker in calls.values() for i in per_worker]
    if not intervals:
        raise RuntimeError(f"no timed operator calls in {output}")
    window = max(e for _, e in intervals) - min(s for s, _ in intervals)
    busy = sum(e - s for s, e in intervals)
    return {"fraction": busy / (gpus * window), "window_s": window, "busy_s": busy, "workers": len(calls),
            "calls": len(intervals)}


def measure(address: str | None, gpus: int, args) -> dict:
    """One run of the whole pipeline on the cluster at ``address`` (None: an embedded one with ``gpus`` GPUs)."""
    import ray

    from pipeline.generate.run import run

    root = Path(tempfile.mkdtemp(prefix="bench-feed-"))
    cfg = config(root / "out", gpus, samples=args.samples, seconds=args.seconds,
                 operator=json.loads(args.operator) if args.operator else None, scoring=args.scoring)
    if address is None:
        # 8 logical CPUs, as the two-node cluster declares in all (4 per node): a 4-GPU machine has many cores
        # per GPU; 4 logical CPUs for 4 GPUs would leave decode and write tasks 2 slots beside the pools.
        ray.init(address="local", num_cpus=8, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        summary = run(cfg, quiet=True)
        total = time.perf_counter() - t0
    finally:
        ray.shutdown()
    if summary.kept != args.samples:
        raise RuntimeError(f"expected {args.samples} kept samples: {summary}")
    result = busy_fraction(str(root / "out"), gpus)
    shutil.rmtree(root, ignore_errors=True)
    return {**result, "run_s": total, "first_call_s": total - result["window_s"]}


def row(name: str, result: dict, gpus: int, args) -> None:
    ratio = result["fraction"]
    what = (f"busy fraction of {gpus} stylize actors (num_gpus 1, batch {BATCH}, "
            f"{'held ' + format(args.seconds, 'g') + ' s' if not args.operator else 'real operator'}), "
            f"{args.samples} samples, {args.scoring} scoring")
    report(name, ratio=ratio, target=">= 0.90", ok=ratio >= 0.90, what=what,
           window_s=round(result["window_s"], 1), busy_s=round(result["busy_s"], 1),
           ideal_s=round(result["busy_s"] / gpus, 1), run_s=round(result["run_s"], 1), workers=result["workers"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cluster", choices=["one-node", "two-node"], help="one row (default: both)")
    parser.add_argument("--address", help="an existing cluster (real GPUs); --gpus says how many actors")
    parser.add_argument("--gpus", type=int, default=4, help="stylize actors, one GPU each (with --address)")
    parser.add_argument("--operator", help="a real operator config (JSON) to time instead of the 1 s hold")
    parser.add_argument("--scoring", default="tiny:clip", help="clip_model of the scorer (tiny:clip, ViT-B-32)")
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--seconds", type=float, default=SECONDS, help="held time per batch of 4")
    args = parser.parse_args()
    if args.address:
        row(f"GPU feeding ({args.gpus} GPUs at {args.address})", measure(args.address, args.gpus, args),
            args.gpus, args)
        return
    if args.cluster is None:  # each row in its own process: Ray keeps the first session's auth token per process
        import subprocess
        import sys

        for cluster in ("one-node", "two-node"):
            subprocess.run([sys.executable, __file__, "--cluster", cluster, *sys.argv[1:]], check=True)
        return
    if args.cluster == "one-node":
        row("GPU feeding (1 node x 4 GPUs)", measure(None, 4, args), 4, args)
    if args.cluster == "two-node":
        from tests.cluster import local_cluster

        with local_cluster(nodes=2, gpus_per_node=2) as cluster:
            import os

            previous = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
            os.environ.update({k: cluster["env"][k] for k in previous})  # the driver authenticates too
            try:
                result = measure(cluster["address"], 4, args)
            finally:
                for k, v in previous.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        row("GPU feeding (2 nodes x 2 GPUs)", result, 4, args)


if __name__ == "__main__":
    main()
