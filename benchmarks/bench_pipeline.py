"""Pipeline vs. a bare loop of the same work, one stylize actor (target: throughput ratio >= 0.90,
docs/architecture.md §8).

Both sides do the same per-sample work on the same inputs: fetch and decode content and style, run the
operator, encode the output, score it with open_clip (ViT-B-32). The pipeline also writes shards and the index.
Two operators: color-transfer (cheap: the pipeline's own overhead shows) and Sissi on tiny:flux-fill (a torch
model, as in production). Throughput is *marginal*: samples per second between a small and a large run, so Ray
start-up and model loading (paid once per run) cancel out on both sides. The two sides alternate (pipeline,
bare, pipeline, bare) so that a busy stretch of the machine cannot favour one side.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_pipeline.py [--operator color-transfer|sissi]  # default: both
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import report  # noqa: E402
from pipeline.config import validate_config  # noqa: E402
from tests.data_paths import samples_dir  # noqa: E402

OPERATORS = {
    "color-transfer": {"name": "color-transfer"},
    "sissi": {"name": "sissi", "model": "tiny:flux-fill", "params": {"panel_size": 64, "steps": 4}},
}
SIZES = {"color-transfer": (2, 8), "sissi": (1, 3)}
# (operator, scoring) num_cpus. Ray gives an actor OMP_NUM_THREADS = num_cpus; the bare loop's torch uses both
# cores for each step in turn, the pipeline runs the two steps at once. color-transfer is numpy (one core), so the
# scorer gets both; with two torch models, one core each (the defaults) keeps 2 threads on 2 cores.
NUM_CPUS = {"color-transfer": (1, 2), "sissi": (1, 1)}


def config(out: Path, styles: int, operator: str = "color-transfer"):
    samples = samples_dir()
    return validate_config({
        "output": {"path": str(out), "samples_per_shard": 16, "fsync": True},
        # Sissi is text-to-image in a style: prompts only (30 prompts -> 30 and 90 samples)
        "content": {"images": None if operator == "sissi" else str(samples / "content"),
                    "prompts": str(samples / "prompts.txt")},
        "style": {"images": str(samples / "style")},
        "pairing": {"styles_per_content": styles},
        "decode": {"max_side": 256},
        "operator": {**OPERATORS[operator], "batch_size": 4, "actors": [1, 1], "num_cpus": NUM_CPUS[operator][0]},
        "scoring": {"clip_model": "ViT-B-32", "clip_pretrained": "none", "batch_size": 16, "actors": [1, 1],
                    "num_cpus": NUM_CPUS[operator][1]},
    })


def bare_loop(cfg) -> float:
    """The same work without Ray: returns seconds for the planned samples (models loaded beforehand)."""
    from operators import build_operator
    from operators.clip_score import ClipScorer
    from pipeline.io.fs import read_range
    from pipeline.io.images import decode_image, encode_image, open_rgb
    from pipeline.plan.keys import build_plan

    op = build_operator(cfg.operator.model_dump())
    scorer = ClipScorer(cfg.scoring.clip_model, cfg.scoring.clip_pretrained)
    plan = build_plan(cfg)
    t0 = time.perf_counter()
    def decode(url, offset, size):
        return decode_image(read_range(url, offset, size), max_pixels=cfg.decode.max_pixels,
                            max_side=cfg.decode.max_side)

    batch, op_batch = cfg.scoring.batch_size, cfg.operator.batch_size
    for start in range(0, len(plan), batch):
        items, styles = [], []
        for s in plan[start:start + batch]:
            style = decode(s.style_url, s.style_offset, s.style_size)
            content = decode(s.content_url, s.content_offset, s.content_size) if s.content_url else None
            items.append({"key": s.key, "prompt": s.prompt, "style": style, "content": content, "seed": s.seed})
            styles.append((s.style_id, style))
        results = [r for i in range(0, len(items), op_batch) for r in op(items[i:i + op_batch])]
        outputs = [open_rgb(encode_image(r["image"], cfg.output.image_format)) for r in results]
        scorer.score(outputs, [item["prompt"] for item in items], styles)
    return time.perf_counter() - t0


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--operator", choices=sorted(OPERATORS), help="one operator (default: each, one row each)")
    chosen = parser.parse_args().operator
    for operator in [chosen] if chosen else list(OPERATORS):
        measure(operator)


def measure(operator: str) -> None:
    """One row: the pipeline and the bare loop at two sizes, alternating."""
    import ray

    from pipeline.generate.run import run
    from pipeline.plan.keys import build_plan

    small, large = SIZES[operator]
    root = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    n_small = len(build_plan(config(root / "s", small, operator)))
    n_large = len(build_plan(config(root / "l", large, operator)))
    pipe, bare = {}, {}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        run(config(root / "warm", 1, operator), quiet=True)  # first-use costs (imports, worker pool) untimed
        for name, styles in (("small", small), ("large", large)):
            t0 = time.perf_counter()
            run(config(root / name, styles, operator), quiet=True)
            pipe[name] = time.perf_counter() - t0
            bare[name] = bare_loop(config(root / f"bare-{name}", styles, operator))
    finally:
        ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)
    pipe_tp = (n_large - n_small) / (pipe["large"] - pipe["small"])
    bare_tp = (n_large - n_small) / (bare["large"] - bare["small"])
    ratio = pipe_tp / bare_tp
    label = "" if operator == "color-transfer" else f", {operator} tiny:flux-fill"
    report(f"pipeline vs bare loop (1 actor{label})", ratio=ratio, target=">= 0.90", ok=ratio >= 0.90,
           what=f"marginal throughput (samples/s), {operator} + ViT-B-32 scoring",
           pipeline_samples_per_s=round(pipe_tp, 2), bare_samples_per_s=round(bare_tp, 2),
           samples=f"{n_small}->{n_large}", pipeline_run_s=f"{pipe['small']:.1f}->{pipe['large']:.1f}")


if __name__ == "__main__":
    main()
