"""Measure how far the AD golden comparisons move under other float kernels, and under a wrong method.

Reruns every case of the SD and FLUX fixtures in fresh processes, each with another kernel path (thread count,
``ATEN_CPU_CAPABILITY``, ``MKL_CBWR``, ``DNNL_MAX_CPU_ISA``: what differs between an Intel and an AMD CPU), plus
one run with the AD layer range shifted by one, and prints per quantity of ``tests/golden.py`` the deviation from
the stored fixtures. The bounds in ``tests/golden.BOUNDS`` were set from this table (about 10x above the largest
kernel deviation, at least 5x below the wrong method). Not part of ``make test``; run it on a new kind of CPU:

    PYTHONPATH=. .venv/bin/python scripts/measure_golden_bounds.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "1 thread": ({}, 1),
    "2 threads": ({}, 2),
    "no SIMD": ({"ATEN_CPU_CAPABILITY": "default"}, 1),
    "MKL compatible": ({"MKL_CBWR": "COMPATIBLE"}, 1),
    "oneDNN SSE4.1": ({"DNNL_MAX_CPU_ISA": "SSE41"}, 1),
    "all three, 2 threads": ({"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
                              "DNNL_MAX_CPU_ISA": "SSE41"}, 2),
}
WRONG = "wrong: layers shifted"


def _shift(layers: list[int]) -> list[int]:
    return [layers[0] - 1, layers[1] - 1] if layers[0] > 0 else [a + 1 for a in layers]


def measure(threads: int, wrong: bool) -> dict[str, float]:
    """Every compared quantity of tests/golden.py as a number: relative errors, and image mean/max pixels."""
    import numpy as np
    import torch

    from operators import ad
    from operators.ad import flux as ad_flux
    from tests import golden as g
    from tests.data_paths import fixture_protocol

    def case_of(cases: dict, name: str) -> dict:
        case = dict(cases[name])
        return {**case, "layers": _shift(case["layers"])} if wrong else case

    def pixels(name: str, have, want) -> dict[str, float]:
        diff = np.abs(g.pixels(have) - g.pixels(want))
        return {f"{name} mean px": float(diff.mean()), f"{name} max px": float(diff.max())}

    out: dict[str, float] = {}
    with fixture_protocol():
        torch.set_num_threads(threads)
        model = ad.load_ad_model(str(g.SD / "model"), "cpu", "fp32")
        want = g.golden(g.SD, g.SD_CASES["loss_grad"])
        l_ad, l_c, grad = g.sd_loss_grad(ad, model, case_of(g.SD_CASES, "loss_grad"))
        out.update({"sd ad_loss": g.rel_error(l_ad, want["ad_loss"]), "sd grad": g.rel_error(grad, want["grad"]),
                    "sd content_loss": g.rel_error(l_c, want["content_loss"])})
        for name in ("optimize_texture", *g.SD_CHAOTIC):
            latents = g.sd_run(ad, model, case_of(g.SD_CASES, name)).latents
            stored = g.golden(g.SD, g.SD_CASES[name])["latents"]
            out[f"sd {name} latents"] = g.rel_error(latents, stored)
            with torch.no_grad():
                out.update(pixels(f"sd {name} image", model.decode_latents(latents), model.decode_latents(stored)))
        pipe = ad_flux.load_flux_pipeline(str(g.FLUX / "model"))
        for name in sorted(g.FLUX_CASES):
            latents, image, trace = g.flux_run(ad_flux, pipe, case_of(g.FLUX_CASES, name))
            stored = g.golden(g.FLUX, g.FLUX_CASES[name])
            got = {**trace, "latents": latents}
            inputs = [g.rel_error(got[k], stored[k]) for k in g.FLUX_INPUTS]
            out[f"flux {name} inputs (max)"] = max(inputs)
            for key in ("loss0", "grad0", "losses", "layer_losses", *g.FLUX_TRACE, "latents"):
                out[f"flux {name} {key}"] = g.rel_error(got[key], stored[key])
            out.update(pixels(f"flux {name} image", image, stored["image"]))
    return out


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        Path(sys.argv[3]).write_text(json.dumps(measure(int(sys.argv[2]), wrong=os.environ.get("WRONG") == "1")))
        return
    root = Path(__file__).resolve().parents[1]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (env, threads) in [*VARIANTS.items(), (WRONG, ({"WRONG": "1"}, 1))]:
            out = Path(tmp) / "out.json"
            subprocess.run([sys.executable, __file__, "--child", str(threads), str(out)], check=True, cwd=root,
                           env={**os.environ, **env, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            results[label] = json.loads(out.read_text())
            print(f"measured: {label}", file=sys.stderr)
    labels = list(results)
    print("| quantity | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for key in results[labels[0]]:
        print(f"| {key} | " + " | ".join(f"{results[label][key]:.2g}" for label in labels) + " |")


if __name__ == "__main__":
    main()
