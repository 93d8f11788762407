"""Device check: the Sissi and AD operators on tiny models, in bf16 on a CUDA GPU (never part of CI).

What nothing on a CPU-only machine can show: the DSSI branches get the flash-attention-with-LSE kernel,
``dssi.mode: vanilla`` stays within bf16 tolerance of stock attention (``off``), regional ``compile`` with
inductor runs and agrees with eager, plus peak GPU memory and time per denoising step for each run. Prints a
markdown table (paste it into the README) and exits 1 if any check fails, 2 if there is no CUDA device.

    make device-check                                  # = .venv/bin/python benchmarks/device_check.py
    .venv/bin/python benchmarks/device_check.py --cpu-smoke --skip-compile   # the same code path, CPU fp32
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from operators import build_operator
from operators.sissi import SissiOperator, kernels
from operators.tiny_flux import save_tiny_flux_fill

# max |vanilla - off| over output pixels in [0, 1]; bf16 rounds every projection, fp32 only reorders sums
TOLERANCE = {torch.bfloat16: 0.08, torch.float32: 1e-4}
COMPILE_TOLERANCE = {torch.bfloat16: 0.08, torch.float32: 1e-3}


@dataclass
class Row:
    check: str
    ok: bool
    value: str
    step_ms: float | None = None
    peak_mib: float | None = None


def _items(n: int, panel: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"key": f"d{i}", "prompt": "a red fox in the snow", "content": None, "seed": i,
         "style": Image.fromarray(rng.integers(0, 256, (panel, panel, 3), dtype=np.uint8))}
        for i in range(n)
    ]


def _measured(
    fn: Callable[[], object], device: torch.device, steps: int, repeats: int
) -> tuple[object, float, float | None]:
    """(result, median ms per denoising step, peak MiB allocated by torch above the start; None on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    return out, 1000 * statistics.median(times) / steps, peak


def check_kernel(device: torch.device, dtype: torch.dtype) -> Row:
    """The fused kernel with LSE that attention_with_lse picks for Flux-like shapes, and its agreement."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 96, 128, generator=g).to(device, dtype) for _ in range(3))
    kernel = kernels.pick_kernel(q)
    expected = "cuda_flash_lse" if device.type == "cuda" else "cpu_flash_lse"
    warned = set(kernels.warned_fallback)
    out, lse = kernels.attention_with_lse(q, k, v)
    ref, ref_lse = kernels.math_attention_lse(q.float(), k.float(), v.float(), 128**-0.5)
    err = max(float((out.float() - ref).abs().max()), float((lse.float() - ref_lse).abs().max()))
    fell_back = kernels.warned_fallback != warned
    ok = kernel.__name__ == expected and not fell_back and err <= (0.05 if dtype == torch.bfloat16 else 1e-4)
    return Row("DSSI branch kernel", ok, f"{kernel.__name__}{' (fell back to math)' if fell_back else ''}, "
               f"max err {err:.2e}")


def check_sissi(model: str, device: torch.device, dtype: torch.dtype, args) -> list[Row]:
    dtype_name = str(dtype).removeprefix("torch.")
    base = {"panel_size": args.panel, "steps": args.steps, "max_sequence_length": 64, "dtype": dtype_name}
    items = _items(args.batch, args.panel)
    runs: dict[str, np.ndarray] = {}
    rows: list[Row] = []
    configs = [("off", {}), ("vanilla", {}), ("dynamic_norm", {})]
    if not args.skip_compile:
        configs += [("off", {"compile": True}), ("dynamic_norm", {"compile": True})]
    for mode, extra in configs:
        name = f"sissi {mode}{' compile' if extra else ''}"
        try:
            op = SissiOperator(model=model, params={**base, **extra, "dssi": {"mode": mode}}, device=str(device))
            canvases = [op.canvas(it["style"]) for it in items]
            prompts = [op.prompt_for(it["prompt"]) for it in items]

            def call(op=op, canvases=canvases, prompts=prompts):
                return op.generate(prompts, canvases, [it["seed"] for it in items])

            call()  # warm-up (and the compile, when on)
            out, step_ms, peak = _measured(call, device, args.steps, args.repeats)
        except Exception as err:  # noqa: BLE001 - a failed run is a failed row, the others still run
            rows.append(Row(name, False, f"{type(err).__name__}: {str(err)[:120]}"))
            continue
        runs[name] = np.asarray(out)
        finite = bool(np.isfinite(runs[name]).all())
        rows.append(Row(name, finite, "finite output" if finite else "non-finite output", step_ms, peak))
    if "sissi off" in runs and "sissi vanilla" in runs:
        diff = float(np.abs(runs["sissi vanilla"] - runs["sissi off"]).max())
        tol = TOLERANCE[dtype]
        rows.append(Row("sissi vanilla == off", diff <= tol, f"max abs diff {diff:.2e} (tol {tol:g})"))
    for mode in ("off", "dynamic_norm"):
        eager, compiled = runs.get(f"sissi {mode}"), runs.get(f"sissi {mode} compile")
        if eager is not None and compiled is not None:
            diff = float(np.abs(compiled - eager).max())
            tol = COMPILE_TOLERANCE[dtype]
            rows.append(Row(f"sissi {mode} compile == eager", diff <= tol, f"max abs diff {diff:.2e} (tol {tol:g})"))
    return rows


def check_ad(device: torch.device, dtype: torch.dtype, args) -> list[Row]:
    """ad-t2i on tiny SD1.5 and tiny FLUX, in the fast mode (bf16 on CUDA, FLUX with gradient checkpointing) and,
    for FLUX, the fp32 reference too."""
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    flux = {"steps": args.steps, "iters": 1, "size": 32, "max_sequence_length": 16}
    cases = [
        ("ad-t2i tiny:sd15", "tiny:sd15", {"steps": args.steps, "iters": 1, "size": 64, "precision": precision}),
        ("ad-t2i tiny:flux fast", "tiny:flux", {**flux, "precision": precision, "fast": True}),
        ("ad-t2i tiny:flux reference", "tiny:flux", {**flux, "precision": "fp32", "fast": False}),
    ]
    rows = []
    for name, model, params in cases:
        try:
            op = build_operator({"name": "ad-t2i", "model": model, "params": params}, device=str(device))
            items = _items(1, 64)
            op(items)  # warm-up
            results, step_ms, peak = _measured(lambda op=op, items=items: op(items), device, args.steps, args.repeats)
        except Exception as err:  # noqa: BLE001
            rows.append(Row(name, False, f"{type(err).__name__}: {str(err)[:120]}"))
            continue
        error = next((r["error"] for r in results if "error" in r), None)
        arr = None if error else np.asarray(results[0]["image"])
        ok = error is None and arr is not None and arr.size > 0
        rows.append(Row(name, ok, error or f"{params.get('precision', 'fp32')}, image {arr.shape[1]}x{arr.shape[0]}",
                        step_ms, peak))
    return rows


def table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| check | ok | result | ms/step | peak MiB |", "|---|---|---|---|---|"]
    for r in rows:
        step = "" if r.step_ms is None else f"{r.step_ms:.1f}"
        peak = "" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        lines.append(f"| {r.check} | {'yes' if r.ok else 'NO'} | {r.value} | {step} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="run the same checks on CPU in fp32")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the compile runs")
    parser.add_argument("--skip-ad", action="store_true", help="leave out the AD operators")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--panel", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per run (median)")
    parser.add_argument("--size", default="small", help="tiny FluxFill size (operators.tiny_flux.SIZES)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    else:
        print("error: device_check needs a CUDA device (torch.cuda.is_available() is False); "
              "use --cpu-smoke to exercise it on CPU", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        model = str(save_tiny_flux_fill(Path(tmp) / "flux-fill", seed=0, size=args.size))
        rows = [check_kernel(device, dtype)]
        rows += check_sissi(model, device, dtype, args)
        if not args.skip_ad:
            rows += check_ad(device, dtype, args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU smoke"
    header = (f"device check: {name}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, "
              f"tiny:flux-fill size={args.size}, {args.panel}-px panels, {args.steps} steps, batch {args.batch}")
    print(table(rows, header))
    failed = [r.check for r in rows if not r.ok]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
