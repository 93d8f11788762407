"""Which params each AD operator and method reads, and their defaults (docs/research/ad.md §3-§5).

Why a table: ``check_params`` refuses at config time, before any model loads, a param the chosen operator and
method would ignore; the same tables give the defaults the operators apply.
"""

from __future__ import annotations

from typing import Any

COMMON = {"method", "steps", "lr", "iters", "layers", "size", "num_images", "precision", "attn_scale", "fast",
           "feature_chunk", "gradient_checkpointing"}

# Params that only some (operator kind, method) pairs read: given elsewhere they would be ignored, so they are an
# error. ``guidance_scale`` is not offered for textures: their prompt is empty, so CFG would only double the work.
APPLIES: dict[str, set[tuple[str, str]]] = {
    "content_weight": {("transfer", "optimize"), ("transfer", "sample")},
    "adain": {("t2i", "sample"), ("transfer", "sample"), ("texture", "sample"), ("texture", "panorama")},
    "guidance_scale": {("t2i", "sample"), ("transfer", "sample")},
    "negative_prompt": {("t2i", "sample"), ("transfer", "sample")},
    "tiling": {("texture", "optimize"), ("texture", "sample"), ("texture", "panorama")},
    "stride": {("texture", "panorama")},
    "start_time": {("t2i", "sample"), ("transfer", "sample"), ("texture", "sample")},
    "init_from_style": {("t2i", "sample")},
    "view_batch_size": {("texture", "panorama")},
    "source_mask": {("texture", "optimize")},
    "target_mask": {("texture", "optimize")},
}

# (operator kind, method) -> defaults (docs/research/ad.md §3-§5).
DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("transfer", "optimize"): {"steps": 200, "lr": 0.05, "iters": 1, "content_weight": 0.25},
    ("transfer", "sample"): {"steps": 50, "lr": 0.05, "iters": 3, "content_weight": 0.25,
                             "guidance_scale": 1.0, "adain": False},
    ("texture", "optimize"): {"steps": 300, "lr": 0.05, "iters": 1},
    ("texture", "sample"): {"steps": 50, "lr": 0.05, "iters": 3, "guidance_scale": 1.0, "adain": False},
    ("texture", "panorama"): {"steps": 50, "lr": 0.05, "iters": 2, "guidance_scale": 1.0, "adain": False,
                              "view_batch_size": 8},
    ("t2i", "sample"): {"steps": 50, "lr": 0.015, "iters": 3, "adain": True, "guidance_scale": 7.5,
                        "negative_prompt": ""},
}
XL_T2I = {"iters": 2, "guidance_scale": 7.0}  # ad.ipynb cell 13


# FLUX (``ad-t2i`` only): the params ``flux_ad_sample`` reads, and the authors' notebook defaults.
# ``precision`` defaults to bf16 on CUDA (the fast mode, with gradient checkpointing), fp32 elsewhere (reference).
FLUX_PARAMS = {"method", "steps", "lr", "iters", "layers", "size", "style_size", "guidance_scale", "start_time",
               "max_sequence_length", "adain", "num_images", "precision", "fast", "gradient_checkpointing"}
FLUX_DEFAULTS: dict[str, Any] = {"steps": 28, "lr": 0.01, "iters": 2, "guidance_scale": 3.5, "start_time": 9999,
                                 "max_sequence_length": 512, "adain": True, "num_images": 1}
FLUX_LAST_CALLS = 7  # default layers: the last 7 joint-attention calls, (50, 57) on FLUX.1-dev
