"""Benchmark: the Sissi operator with DSSI (the default mode) against stock attention (``dssi.mode: off``).

Both operators load the same random-weight "bench" FluxFill (attention is a real share of its cost) and
stylize the same items with 256-px panels, in this one process: warm-up, then alternating timed runs, median.
Measured three ways: the whole operator call (the target), one transformer forward on the inputs it really
receives, and one layer's attention call alone (DSSI against SDPA, same shapes).

Time: on CPU the primary figure is this process's CPU time with one intra-op thread, because wall time on a
shared machine swings with other people's load; wall time is reported next to it. On CUDA it is wall time
with synchronisation. Peak memory: the torch-allocator peak during a call above what was allocated before it
(the profiler's allocation timeline on CPU, ``max_memory_allocated`` on CUDA), also with the model added.
Prints one JSON line with absolute figures and the dynamic/off ratios (targets: time <= 1.25, memory <= 1.3).

    .venv/bin/python benchmarks/bench_sissi.py [--repeats 5] [--steps 4] [--panel 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from operators.sissi import DSSIConfig, SissiOperator, diptych_layout, dssi_attention
from operators.tiny_flux import save_tiny_flux_fill

logger = logging.getLogger("bench_sissi")
DSSI = DSSIConfig().mode  # the default the operator ships with
MODES = ("off", DSSI)


def _items(n: int, panel: int) -> list[dict]:
    rng = np.random.default_rng(0)
    prompts = ["a red fox in the snow", "a lighthouse on a cliff at dusk", "a bowl of fruit", "a city street"]
    return [
        {
            "key": f"b{i}",
            "prompt": prompts[i % len(prompts)],
            "style": Image.fromarray(rng.integers(0, 256, (panel, panel, 3), dtype=np.uint8)),
            "content": None,
            "seed": i,
        }
        for i in range(n)
    ]


def _operator_call(op: SissiOperator, items: list[dict]) -> Callable[[], None]:
    def call() -> None:
        errors = [r["error"] for r in op(items) if "error" in r]
        if errors:
            raise RuntimeError(f"operator failed: {errors[0]}")

    return call


def _forward_call(op: SissiOperator, items: list[dict]) -> Callable[[], None]:
    """One transformer forward on the exact inputs the pipeline gives it at its first step."""
    captured: dict = {}

    def grab(_module, args, kwargs):
        if not captured:
            captured.update(kwargs)
            captured["args"] = args

    handle = op.pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        op(items)
    finally:
        handle.remove()
    args = captured.pop("args")

    @torch.inference_mode()
    def call() -> None:
        if op.state is not None:
            op.state.set_step(0, op.params.steps)
        op.pipe.transformer(*args, **captured)

    return call


def _measure(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def _timings(calls: dict[str, Callable[[], None]], device: torch.device, repeats: int) -> dict[str, dict]:
    for mode in MODES:  # warm-up: allocator, kernels, lazy init
        calls[mode]()
    samples: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for r in range(repeats):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            samples[mode].append(_measure(calls[mode], device))
    return {
        m: {
            "wall_s": statistics.median(w for w, _ in s),
            "cpu_s": statistics.median(c for _, c in s),
        }
        for m, s in samples.items()
    }


def _peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by torch during one call, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        ((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage),
        key=lambda x: x[0],
    )
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def _attention_share(fn: Callable[[], None]) -> float:
    """Share of CPU op time spent in attention kernels (stock model)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    averages = prof.key_averages()
    total = sum(a.self_cpu_time_total for a in averages)
    attention = sum(a.self_cpu_time_total for a in averages if "attention" in a.key)
    return attention / max(total, 1e-9)


def _attention_calls(op: SissiOperator, batch: int) -> dict[str, Callable[[], None]]:
    """One layer's attention alone at the operator's shapes: DSSI (default mode) against SDPA."""
    tr = op.pipe.transformer
    heads, head_dim = tr.config.num_attention_heads, tr.config.attention_head_dim
    n_img = 2 * op.panel_tokens[0] * op.panel_tokens[1]
    text_len = op.params.max_sequence_length
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, text_len + n_img, head_dim, generator=g).to(op.device, op.dtype) for _ in range(3)
    )
    style_index, output_index = diptych_layout(*op.panel_tokens)

    def stock() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def dssi() -> None:
        dssi_attention(q, k, v, text_len=text_len, style_index=style_index, output_index=output_index, mode=DSSI)

    return {"off": stock, DSSI: dssi}


def _model_bytes(op: SissiOperator) -> int:
    parts = (op.pipe.transformer, op.pipe.vae, op.pipe.text_encoder, op.pipe.text_encoder_2)
    return sum(p.numel() * p.element_size() for m in parts for p in m.parameters())


def _section(timing: dict[str, dict], peaks: dict[str, int], model_bytes: int, primary: str) -> dict:
    return {
        "time_s": {m: round(timing[m][primary], 4) for m in MODES},
        "wall_s": {m: round(timing[m]["wall_s"], 4) for m in MODES},
        "peak_bytes": peaks,
        "time_ratio": round(timing[DSSI][primary] / timing["off"][primary], 4),
        "wall_time_ratio": round(timing[DSSI]["wall_s"] / timing["off"]["wall_s"], 4),
        "peak_memory_ratio": round(peaks[DSSI] / max(peaks["off"], 1), 4),
        "peak_memory_ratio_with_model": round((model_bytes + peaks[DSSI]) / (model_bytes + peaks["off"]), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--panel", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", default="bench", help="tiny model size (operators.tiny_flux.SIZES)")
    parser.add_argument("--model", default=None, help="use this model instead of a tiny one")
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads on CPU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    primary = "cpu_s" if device.type == "cpu" else "wall_s"

    with tempfile.TemporaryDirectory(prefix="bench-sissi-") as tmp:
        model = args.model or str(save_tiny_flux_fill(Path(tmp) / "model", seed=0, size=args.size))
        common = {"panel_size": args.panel, "steps": args.steps, "max_sequence_length": args.max_sequence_length}
        ops = {m: SissiOperator(model=model, params={**common, "dssi": {"mode": m}}, device=args.device) for m in MODES}
        items = _items(args.batch, args.panel)
        whole = {m: _operator_call(ops[m], items) for m in MODES}
        forward = {m: _forward_call(ops[m], items) for m in MODES}
        whole_t = _timings(whole, device, args.repeats)
        forward_t = _timings(forward, device, max(args.repeats, 2 * args.repeats))
        whole_peak = {m: _peak_bytes(whole[m], device) for m in MODES}
        forward_peak = {m: _peak_bytes(forward[m], device) for m in MODES}
        attention = _attention_calls(ops[DSSI], args.batch)
        attention_t = _timings(attention, device, 4 * args.repeats)
        attention_peak = {m: _peak_bytes(attention[m], device) for m in MODES}
        share = _attention_share(forward["off"]) if device.type == "cpu" else None
        model_bytes = _model_bytes(ops["off"])

    operator = _section(whole_t, whole_peak, model_bytes, primary)
    report = {
        "benchmark": f"sissi_dssi_{DSSI}_vs_stock",
        "dssi_mode": DSSI,
        "device": args.device,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "time_measure": "process_cpu_time" if primary == "cpu_s" else "wall_time",
        "model": args.model or f"tiny:flux-fill size={args.size}",
        "panel": args.panel,
        "steps": args.steps,
        "batch": args.batch,
        "repeats": args.repeats,
        "model_bytes": model_bytes,
        "time_ratio": operator["time_ratio"],
        "peak_memory_ratio": operator["peak_memory_ratio"],
        "operator": operator,
        "transformer_forward": {
            **_section(forward_t, forward_peak, model_bytes, primary),
            "attention_share_off": None if share is None else round(share, 4),
        },
        "attention_call": _section(attention_t, attention_peak, 0, primary),
        "targets": {"time_ratio": 1.25, "peak_memory_ratio": 1.3},
    }
    print(json.dumps(report))
    from benchmarks.common import report as bench_report

    op_time, op_mem = operator["time_ratio"], operator["peak_memory_ratio"]
    what = f"whole operator, {report['model']}, {args.panel}-px panels, {args.steps} steps ({report['time_measure']})"
    bench_report(f"Sissi: DSSI {DSSI} (default) vs stock attention", ratio=op_time, target="<= 1.25",
                 ok=op_time <= 1.25, what=what, peak_memory_ratio=op_mem,
                 transformer_forward_time_ratio=report["transformer_forward"].get("time_ratio"))
    bench_report("Sissi: DSSI peak memory vs stock", ratio=op_mem, target="<= 1.3", ok=op_mem <= 1.3,
                 what="whole-operator peak memory ratio", time_ratio=op_time)


if __name__ == "__main__":
    main()
