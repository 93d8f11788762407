"""The registry operator ``sissi``: each item's diptych [style | masked target] through FluxFill with DSSI.

Why a module of its own: loading the pipeline, turning items into diptychs, running a batch (item by item when
the batch fails) and writing each result's meta are operator plumbing, kept apart from the method
(:mod:`~operators.sissi.dssi`) and from how it is put into the model (:mod:`~operators.sissi.processor`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from operators.sissi.dssi import diptych_layout
from operators.sissi.params import DEFAULT_MODEL, PROMPT_TEMPLATES, parse_params
from operators.sissi.processor import install_dssi, select_layers, set_backend

logger = logging.getLogger(__package__)  # "operators.sissi", the name these log lines had before the split


def _to_rgb(image) -> Any:
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ValueError(f"style must be a PIL image, got {type(image).__name__}")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class SissiOperator:
    """Stylize a batch: diptych [style | masked target] through FluxFill + DSSI; returns the target panel."""

    name = "sissi"

    @staticmethod
    def check_params(params: dict[str, Any] | None) -> None:
        parse_params(params)

    def __init__(self, model: str | None = None, params: dict[str, Any] | None = None, device: str = "cpu"):
        from diffusers import FluxFillPipeline

        from operators.models import resolve_model

        self.params = parse_params(params)
        self.model_spec = model or DEFAULT_MODEL
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # match tensors' "cuda:N" for caches
            self.device = torch.device("cuda", torch.cuda.current_device())
        dtype_name = self.params.dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        self.dtype = getattr(torch, dtype_name)

        pipe = FluxFillPipeline.from_pretrained(resolve_model(self.model_spec), use_safetensors=True, dtype=self.dtype)
        pipe.set_progress_bar_config(disable=True)
        token_px = pipe.vae_scale_factor * 2
        width, height = self.params.panel_size
        if width % token_px or height % token_px:
            raise ValueError(f"panel_size {width}x{height} must be a multiple of {token_px} px")
        self.panel_tokens = (width // token_px, height // token_px)
        style_index, output_index = diptych_layout(*self.panel_tokens)
        self.state = install_dssi(
            pipe.transformer, self.params.dssi, style_index, output_index, n_img=2 * output_index.numel()
        )
        if self.state is not None:  # text is padded to max_sequence_length, so positions are known now
            self.state.positions(self.device, self.params.max_sequence_length + self.state.n_img)
        tr = pipe.transformer
        self.dssi_layers = (
            []
            if self.state is None
            else select_layers(self.params.dssi.layers, len(tr.transformer_blocks), len(tr.single_transformer_blocks))
        )
        if self.params.vae_tiling:
            pipe.vae.enable_tiling()
        if self.params.offload and self.device.type != "cpu":
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            if self.params.offload:
                logger.warning("offload needs an accelerator; running on %s without it", self.device)
            pipe.to(self.device)
        if self.params.attention_backend is not None:  # after install_dssi: it sets every processor's backend
            set_backend(tr, self.params.attention_backend)
        if self.params.cache == "first_block":
            from diffusers.hooks import FirstBlockCacheConfig

            tr.enable_cache(FirstBlockCacheConfig(threshold=self.params.cache_threshold))
        if self.params.compile:
            tr.compile_repeated_blocks(fullgraph=False)
        self.pipe = pipe
        logger.info(
            "sissi ready: model=%s device=%s dtype=%s dssi=%s layers=%d",
            self.model_spec,
            self.device,
            dtype_name,
            self.params.dssi.mode,
            len(self.dssi_layers),
        )

    # -- inputs ---------------------------------------------------------------------------------------

    def prompt_for(self, prompt: str | None) -> str:
        template = PROMPT_TEMPLATES.get(self.params.prompt_template, self.params.prompt_template)
        return template.replace("{prompt}", str(prompt or "").strip())

    def canvas(self, style) -> Any:
        """The diptych of one item: its style image fitted to the left panel, the right panel grey."""
        from PIL import Image, ImageOps

        if isinstance(style, list | tuple):
            if len(style) != 1:
                raise ValueError(
                    f"{len(style)} style images given; sissi takes exactly one style image per sample"
                    " (a multi-panel layout is not implemented)"
                )
            style = style[0]
        width, height = self.params.panel_size
        panel = ImageOps.fit(_to_rgb(style), (width, height), method=Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (2 * width, height), (127, 127, 127))
        canvas.paste(panel, (0, 0))
        return canvas

    def _mask(self) -> Any:
        from PIL import Image

        width, height = self.params.panel_size
        mask = Image.new("L", (2 * width, height), 0)
        mask.paste(255, (width, 0, 2 * width, height))
        return mask

    # -- running ----------------------------------------------------------------------------------------

    def _on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if self.state is not None:
            self.state.set_step(step + 1, self.params.steps)
        return {}

    @torch.inference_mode()
    def generate(self, prompts: list[str], canvases: list, seeds: list[int]) -> np.ndarray:
        """Run FluxFill on the diptychs; float32 target panels ``(B, H, W, 3)`` in [0, 1]."""
        width, height = self.params.panel_size
        if self.state is not None:
            self.state.set_step(0, self.params.steps)
            if self.state.stats is not None:
                self.state.stats.clear()
            self.state.prompt_len = self.prompt_lengths(prompts) if self.state.config.text_tokens == "prompt" else None
        tr = self.pipe.transformer
        caching = self.params.cache != "off"
        if caching:  # each call starts cold: no residual carried over from the previous batch
            tr._reset_stateful_cache()
        with tr.cache_context("cond") if caching else contextlib.nullcontext():
            result = self._pipe_call(prompts, canvases, seeds)
        return np.asarray(result.images, dtype=np.float32)[:, :, width:, :]

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        """T5 tokens of each prompt, end token included, as FluxPipeline tokenizes it (padding excluded)."""
        tokens = self.pipe.tokenizer_2(
            prompts,
            padding="max_length",
            max_length=self.params.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        )
        return [int(n) for n in tokens.attention_mask.sum(dim=1)]

    def _pipe_call(self, prompts: list[str], canvases: list, seeds: list[int]):
        width, height = self.params.panel_size
        return self.pipe(
            prompt=prompts,
            image=canvases,
            mask_image=self._mask(),
            height=height,
            width=2 * width,
            num_inference_steps=self.params.steps,
            guidance_scale=self.params.guidance,
            max_sequence_length=self.params.max_sequence_length,
            generator=[torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds],
            output_type="np",
            callback_on_step_end=self._on_step_end,
            callback_on_step_end_tensor_inputs=[],
        )

    def _stats_per_item(self, n_items: int) -> list[dict[str, Any]] | None:
        if self.state is None or self.state.stats is None:
            return None
        records = self.state.stats
        if not records:
            return [{"calls": 0} for _ in range(n_items)]
        stacked = torch.stack([r[2] for r in records])  # (calls, B, 4)
        layers = sorted({r[0] for r in records})
        out = []
        for b in range(n_items):
            mean = stacked[:, b].mean(dim=0).tolist()
            per_layer = {
                str(layer): round(float(torch.stack([r[2][b, 3] for r in records if r[0] == layer]).mean()), 6)
                for layer in layers
            }
            out.append(
                {
                    "calls": len(records),
                    "steps": sorted({r[1] for r in records}),
                    "alpha_text": mean[0],
                    "alpha_style": mean[1],
                    "alpha_self": mean[2],
                    "lambda": mean[3],
                    "lambda_per_layer": per_layer,
                    "lambda_per_step": self._lambda_per_step(records, b),
                }
            )
        return out

    def _lambda_per_step(self, records, b: int) -> dict[str, dict[str, dict[str, float]]]:
        """``{group: {step: {mean, min, max}}}`` of item b's lambda, groups ``double`` and ``single`` layers."""
        groups: dict[str, dict[int, list[torch.Tensor]]] = {}
        for layer, step, row in records:
            group = "double" if layer < self.state.n_double else "single"
            groups.setdefault(group, {}).setdefault(step, []).append(row[b])
        out: dict[str, dict[str, dict[str, float]]] = {}
        for group, steps in groups.items():
            out[group] = {}
            for step, rows in sorted(steps.items()):
                stack = torch.stack(rows)  # (layers, 6): masses, lambda mean/min/max per layer
                out[group][str(step)] = {
                    "mean": round(float(stack[:, 3].mean()), 6),
                    "min": round(float(stack[:, 4].min()), 6),
                    "max": round(float(stack[:, 5].max()), 6),
                }
        return out

    def _meta(self, item: dict[str, Any], prompt: str) -> dict[str, Any]:
        p = self.params
        return {
            "operator": self.name,
            "model": self.model_spec,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "seed": int(item["seed"]),
            "prompt": prompt,
            "prompt_template": p.prompt_template,
            "panel_size": list(p.panel_size),
            "canvas_size": [2 * p.panel_size[0], p.panel_size[1]],
            "layout": "style-left/target-right, mask=1 on target",
            "style_fit": "center-crop to panel",
            "steps": p.steps,
            "guidance": p.guidance,
            "max_sequence_length": p.max_sequence_length,
            "offload": p.offload,
            "vae_tiling": p.vae_tiling,
            "compile": p.compile,
            "cache": p.cache,
            **({"cache_threshold": p.cache_threshold} if p.cache != "off" else {}),
            "attention_backend": p.attention_backend,
            "dssi": {
                **asdict(p.dssi),
                "steps": list(p.dssi.steps),
                "resolved_layers": list(self.dssi_layers),
            },
            "content_used": False,
        }

    def _run(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prompts = [self.prompt_for(it.get("prompt")) for it in items]
        arrays = self.generate(prompts, [it["_canvas"] for it in items], [it["seed"] for it in items])
        stats = self._stats_per_item(len(items))
        results = []
        for b, (item, prompt, array) in enumerate(zip(items, prompts, arrays, strict=True)):
            meta = self._meta(item, prompt)
            if stats is not None:
                meta["dssi_stats"] = stats[b]
            if self.state is not None and self.state.prompt_len is not None:
                meta["dssi"]["text_keys"] = self.state.prompt_len[b]
            results.append({"key": item["key"], "image": _to_pil(array), "meta": meta})
        return results

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One result per item, same order; a sample that cannot be made gets ``{"key", "error"}``."""
        results: list[dict[str, Any] | None] = [None] * len(items)
        ready = []
        for i, item in enumerate(items):
            try:
                int(item["seed"])
                ready.append((i, {**item, "_canvas": self.canvas(item.get("style"))}))
            except Exception as err:  # noqa: BLE001 - a bad sample becomes a failed row, never a crash
                results[i] = {"key": item.get("key"), "error": f"bad input: {err}"}
        for i, result in _run_with_fallback(self._run, ready, self.device):
            results[i] = result
        return results  # type: ignore[return-value]


def _to_pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8), mode="RGB")


def _run_with_fallback(run, ready: list[tuple[int, dict]], device: torch.device) -> Iterable[tuple[int, dict]]:
    """Run the batch at once; if that fails, item by item so one bad sample fails alone."""
    if not ready:
        return []
    try:
        return list(zip([i for i, _ in ready], run([item for _, item in ready]), strict=True))
    except Exception as err:  # noqa: BLE001
        if len(ready) == 1:
            return [(ready[0][0], {"key": ready[0][1].get("key"), "error": f"{type(err).__name__}: {err}"})]
        logger.warning("sissi batch of %d failed (%s); retrying item by item", len(ready), err)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = []
    for i, item in ready:
        out.extend((i, r) for _, r in _run_with_fallback(run, [(0, item)], device))
    return out
