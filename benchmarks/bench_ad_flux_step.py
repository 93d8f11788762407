"""FLUX AD: time per sampling step, fast mode vs. the reference algorithm, same tiny model, one process.

A step is one Euler step followed by its AD refinement (the styles' null-prompt feature pass, then ``iters`` x
forward/backward/Adam), timed as a whole ``flux_ad_sample`` divided by its steps. Two style images, so the fast
mode's one batched feature pass (instead of one per style) counts. On CUDA the fast mode runs in bf16 with
gradient checkpointing and the peak memory ratio is reported too; on CPU both run in fp32 (the fast mode's
checkpointing would only add a recompute there). Target: fast <= 1.0x the reference on CPU.

    .venv/bin/python benchmarks/bench_ad_flux_step.py [--model tiny:flux] [--size 128] [--steps 8] [--reps 5]
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

from operators.ad.flux import flux_ad_sample, load_flux_model  # noqa: E402

log = logging.getLogger("bench_ad_flux_step")


def _styles(size: int, count: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand((count, 3, 8, 8), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)


def _time(pipe, styles, args, fast: bool, checkpointing: bool, device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    _, image, _ = flux_ad_sample(pipe, styles, "a house by a lake", height=args.size, width=args.size,
                                 steps=args.steps, lr=0.01, iters=args.iters, layers=args.layers,
                                 guidance_scale=3.5, max_sequence_length=64, generator=torch.Generator().manual_seed(0),
                                 gradient_checkpointing=checkpointing, fast=fast)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert torch.isfinite(image).all()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    return (time.perf_counter() - start) / args.steps, peak


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:flux")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--styles", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    ref_pipe = load_flux_model(args.model, "fp32", args.device)
    fast_pipe = load_flux_model(args.model, "bf16", args.device) if cuda else ref_pipe
    calls = len(ref_pipe.transformer.transformer_blocks) + len(ref_pipe.transformer.single_transformer_blocks)
    args.layers = (max(calls - 7, 0), calls)
    styles = _styles(args.size, args.styles)
    modes = {"reference": (ref_pipe, False, False), "fast": (fast_pipe, True, cuda)}
    times: dict[str, list[float]] = {name: [] for name in modes}
    peaks: dict[str, float] = {}
    for name, (pipe, fast, ckpt) in modes.items():  # warm-up
        peaks[name] = _time(pipe, styles, args, fast, ckpt, device)[1]
    for _ in range(args.reps):  # interleaved, so drift hits both alike
        for name, (pipe, fast, ckpt) in modes.items():
            times[name].append(_time(pipe, styles, args, fast, ckpt, device)[0])
    ref_s, fast_s = (statistics.median(times[n]) for n in ("reference", "fast"))
    ratio = fast_s / ref_s
    figures = {"reference_ms_per_step": round(ref_s * 1e3, 2), "fast_ms_per_step": round(fast_s * 1e3, 2),
               "fast_precision": "bf16+checkpointing" if cuda else "fp32", "styles": args.styles}
    if cuda:
        figures["peak_memory_ratio"] = round(peaks["fast"] / max(peaks["reference"], 1e-9), 3)
    log.info("reference %.2f ms/step, fast %.2f ms/step, ratio %.3f (target <= 1.0)", ref_s * 1e3, fast_s * 1e3, ratio)
    sys.stdout.write(json.dumps({"benchmark": "ad_flux_step", "ratio": round(ratio, 4), **figures}) + "\n")
    from benchmarks.common import report

    return report("FLUX AD step: fast mode vs reference", ratio=ratio, target="<= 1.0", ok=ratio <= 1.0,
                  what=f"time per sampling step ({args.model}, {args.size}px, {args.styles} styles, {args.device}, "
                       f"{args.threads} thread(s))", **figures)


if __name__ == "__main__":
    main()
