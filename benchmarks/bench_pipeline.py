"""Pipeline vs. a bare loop of the same work, one stylize actor (target: throughput ratio >= 0.90,
docs/architecture.md §8).

Both sides do the same per-sample work on the same inputs: fetch and decode content and style, run the
operator (color-transfer), encode the output, score it with open_clip (ViT-B-32). The pipeline also writes
shards and the index. Throughput is *marginal*: samples per second between a small and a large run, so
Ray start-up and model loading (paid once per run) cancel out on both sides.
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

SMALL, LARGE = 2, 8  # styles per content: 14 content images -> 28 and 112 samples


def config(out: Path, styles: int):
    samples = samples_dir()
    return validate_config({
        "output": {"path": str(out), "samples_per_shard": 16, "fsync": True},
        "content": {"images": str(samples / "content"), "prompts": str(samples / "prompts.txt")},
        "style": {"images": str(samples / "style")},
        "pairing": {"styles_per_content": styles},
        "decode": {"max_side": 256},
        "operator": {"name": "color-transfer", "batch_size": 4, "actors": [1, 1]},
        # num_cpus 2: Ray gives an actor OMP_NUM_THREADS = num_cpus, and the bare loop's torch uses both cores.
        "scoring": {"clip_model": "ViT-B-32", "clip_pretrained": "none", "batch_size": 16, "actors": [1, 1],
                    "num_cpus": 2},
    })


def bare_loop(cfg) -> float:
    """The same work without Ray: returns seconds for the planned samples (models loaded beforehand)."""
    from operators import build_operator
    from operators.clip_score import ClipScorer
    from pipeline.fs import read_range
    from pipeline.images import decode_image, encode_image, open_rgb
    from pipeline.plan import build_plan

    op = build_operator(cfg.operator.model_dump())
    scorer = ClipScorer(cfg.scoring.clip_model, cfg.scoring.clip_pretrained)
    plan = build_plan(cfg)
    t0 = time.perf_counter()
    batch = cfg.scoring.batch_size
    for start in range(0, len(plan), batch):
        outputs, prompts, styles = [], [], []
        for s in plan[start:start + batch]:
            content = decode_image(read_range(s.content_url, s.content_offset, s.content_size),
                                   max_pixels=cfg.decode.max_pixels, max_side=cfg.decode.max_side)
            style = decode_image(read_range(s.style_url, s.style_offset, s.style_size),
                                 max_pixels=cfg.decode.max_pixels, max_side=cfg.decode.max_side)
            result = op([{"key": s.key, "prompt": s.prompt, "style": style, "content": content, "seed": s.seed}])[0]
            outputs.append(open_rgb(encode_image(result["image"], cfg.output.image_format)))
            prompts.append(s.prompt)
            styles.append((s.style_id, style))
        scorer.score(outputs, prompts, styles)
    return time.perf_counter() - t0


def main() -> None:
    import ray

    from pipeline.plan import build_plan
    from pipeline.run import run

    root = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    n_small = len(build_plan(config(root / "s", SMALL)))
    n_large = len(build_plan(config(root / "l", LARGE)))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        run(config(root / "warm", 1), quiet=True)  # first-use costs (imports, worker pool) outside the timing
        timings = {}
        for name, styles in (("small", SMALL), ("large", LARGE)):
            t0 = time.perf_counter()
            run(config(root / name, styles), quiet=True)
            timings[name] = time.perf_counter() - t0
    finally:
        ray.shutdown()
    bare_small = bare_loop(config(root / "bs", SMALL))
    bare_large = bare_loop(config(root / "bl", LARGE))
    shutil.rmtree(root, ignore_errors=True)
    pipe_tp = (n_large - n_small) / (timings["large"] - timings["small"])
    bare_tp = (n_large - n_small) / (bare_large - bare_small)
    ratio = pipe_tp / bare_tp
    report("pipeline vs bare loop (1 actor)", ratio=ratio, target=">= 0.90", ok=ratio >= 0.90,
           what="marginal throughput (samples/s), color-transfer + ViT-B-32 scoring",
           pipeline_samples_per_s=round(pipe_tp, 2), bare_samples_per_s=round(bare_tp, 2),
           samples=f"{n_small}->{n_large}", pipeline_run_s=f"{timings['small']:.1f}->{timings['large']:.1f}")


if __name__ == "__main__":
    main()
