"""Time per AD optimisation step: fast path vs. the straightforward reference algorithm, same model, one process.

A step is one timestep of ``optimize()`` (style + content features, then ``iters`` x forward/backward/Adam),
timed as a whole run divided by its number of steps, so the fast path's batched feature precompute is
amortised as it is in real use. Prints both figures, the ratio (target <= 0.8) and a JSON line on stdout.

    .venv/bin/python benchmarks/bench_ad_step.py [--model tiny:sd15] [--steps 16] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators import ad  # noqa: E402

log = logging.getLogger("bench_ad_step")


def _images(size: int, count: int, seed: int) -> torch.Tensor:
    """Smooth random images in [0,1]; timing does not depend on what they show."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((count, 3, 8, 8), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)


def _time_run(model: ad.ADModel, cfg: ad.ADConfig, style, content, size: int, device) -> float:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    run = ad.optimize(model, style, content, num_images=1, height=size, width=size, cfg=cfg, generator=generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert torch.isfinite(run.latents).all()
    return (time.perf_counter() - start) / cfg.steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:sd15")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="fast path precision (default bf16 on CUDA, else fp32)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fast_precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")

    ref_model = ad.load_ad_model(args.model, args.device, "fp32")
    fast_model = ad.load_ad_model(args.model, args.device, fast_precision,
                                  checkpointing=ref_model.is_xl)
    native = ref_model.native_size
    latent = native // ref_model.vae_scale
    style = ref_model.encode_images(_images(native, 1, 1))
    content = ref_model.encode_images(_images(native, 1, 2))
    base = {"layers": ref_model.default_layers(), "lr": 0.05, "iters": args.iters, "steps": args.steps,
            "content_weight": 0.25}
    modes = {
        "reference": (ref_model, ad.ADConfig(**base, fast=False)),
        "fast": (fast_model, ad.ADConfig(**base, fast=True)),
    }
    times: dict[str, list[float]] = {name: [] for name in modes}
    for model, cfg in modes.values():  # warm-up
        _time_run(model, cfg, style, content, latent, device)
    for _ in range(args.reps):  # interleaved, so drift hits both alike
        for name, (model, cfg) in modes.items():
            times[name].append(_time_run(model, cfg, style, content, latent, device))
    ref_s, fast_s = (statistics.median(times[n]) for n in ("reference", "fast"))
    result = {
        "benchmark": "ad_step", "model": args.model, "device": args.device, "fast_precision": fast_precision,
        "threads": args.threads, "steps": args.steps, "iters": args.iters, "reps": args.reps,
        "reference_s_per_step": round(ref_s, 6), "fast_s_per_step": round(fast_s, 6),
        "ratio": round(fast_s / ref_s, 4), "target": 0.8,
    }
    log.info("reference %.2f ms/step, fast %.2f ms/step, ratio %.3f (target <= 0.8)",
             ref_s * 1e3, fast_s * 1e3, fast_s / ref_s)
    sys.stdout.write(json.dumps(result) + "\n")
    from benchmarks.common import report

    report("AD step: fast path vs reference", ratio=fast_s / ref_s, target="<= 0.8", ok=fast_s / ref_s <= 0.8,
           what=f"time per AD step ({args.model}, {args.device}, {args.threads} thread(s))",
           reference_ms_per_step=round(ref_s * 1e3, 2), fast_ms_per_step=round(fast_s * 1e3, 2))
    return result


if __name__ == "__main__":
    main()
