"""Textures beyond the native size: MultiDiffusion panorama with AD on every window batch, and seamless tiling."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from operators.ad.model import ADModel, Cond
from operators.ad.sd import (
    ADConfig,
    ADRun,
    Request,
    TargetFeatures,
    ad_refine,
    ad_timestep,
    draw_step_noise,
    finish,
    randn,
)


def panorama_views(height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """MultiDiffusion windows ``(h0, h1, w0, w1)`` in latent pixels covering a ``height x width`` latent."""
    rows = math.ceil((height - window) / stride) + 1 if height > window else 1
    cols = math.ceil((width - window) / stride) + 1 if width > window else 1
    views = []
    for i in range(rows):
        for j in range(cols):
            h0 = int(min(i * stride, height - window)) if height > window else 0
            w0 = int(min(j * stride, width - window)) if width > window else 0
            views.append((h0, h0 + min(window, height), w0, w0 + min(window, width)))
    return views


def panorama(
    model: ADModel,
    style: torch.Tensor,
    *,
    num_images: int,
    height: int,
    width: int,
    stride: int,
    view_batch_size: int,
    adain_on: bool,
    cfg: ADConfig,
    generator: torch.Generator,
    prompt: str = "",
    negative_prompt: str = "",
    guidance_scale: float = 1.0,
) -> ADRun:
    """Texture larger than the model's native size: AD-guided sampling on overlapping windows, averaged.

    Style features are extracted with fresh noise for every window batch, as the authors do, in both modes (fast
    mode batches the extractions of ``feature_chunk`` window batches into one forward).
    """
    scheduler = model.scheduler()
    window = int(model.unet.config.sample_size)
    views = panorama_views(height, width, window, stride)
    batches = [views[i:i + view_batch_size] for i in range(0, len(views), view_batch_size)]
    do_cfg = guidance_scale > 1.0
    win_px = min(window, height) * model.vae_scale, min(window, width) * model.vae_scale
    prompt_cond = model.prompt_cond(prompt, negative_prompt, num_images, do_cfg, *win_px)
    null = model.null_cond(*win_px)
    channels = model.unet.config.in_channels
    latents = randn(generator, (num_images, channels, height, width), model.device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(cfg.steps)
    timesteps = list(scheduler.timesteps)
    t_ads = [ad_timestep(t, scheduler) for t in timesteps]
    per_step = len(batches)
    noises = [[draw_step_noise(generator, style, None, adain_on, model.device) for _ in range(per_step)]
              for _ in timesteps]
    requests = [Request(ta, scheduler.add_noise(style, n.style, ta), None)
                for ta, step in zip(t_ads, noises, strict=True) for n in step]
    targets = TargetFeatures(model, cfg, null, requests)
    # Row r of a window batch is (view r // B, image r % B); CFG pairs [negative, positive] per row.
    if do_cfg:
        neg, pos = prompt_cond.embeds.chunk(2)
        pair = torch.stack([neg, pos], dim=1).flatten(0, 1)
        pair_cond = Cond(pair, *(_pair_rows(x) for x in (prompt_cond.text_embeds, prompt_cond.time_ids)))
    run = ADRun(latents)
    value, count = torch.zeros_like(latents), torch.zeros_like(latents)
    for i, t in enumerate(timesteps):
        value.zero_()
        count.zero_()
        for j, batch in enumerate(batches):
            crops = torch.cat([latents[:, :, h0:h1, w0:w1] for h0, h1, w0, w1 in batch])
            with torch.no_grad():
                if do_cfg:
                    eps = model.eps(crops.repeat_interleave(2, dim=0), t, pair_cond.batch(len(batch)))
                    eps = eps[::2] + guidance_scale * (eps[1::2] - eps[::2])
                else:
                    eps = model.eps(crops, t, prompt_cond.batch(len(batch)))
                denoised = scheduler.step(eps, t, crops, return_dict=False)[0]
            if cfg.iters > 0:
                k = i * per_step + j
                step_noise = noises[i][j]
                adain_target = scheduler.add_noise(style, step_noise.adain, t_ads[i]) if adain_on else None
                denoised = ad_refine(model, denoised, t_ads[i], targets[k], adain_target, null, cfg, run)
            for crop, (h0, h1, w0, w1) in zip(denoised.chunk(len(batch)), batch, strict=True):
                value[:, :, h0:h1, w0:w1] += crop
                count[:, :, h0:h1, w0:w1] += 1
        latents = torch.where(count > 0, value / count, value)
    run.latents = latents
    return finish(run)


def _pair_rows(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None:
        return None
    neg, pos = x.chunk(2)
    return torch.stack([neg, pos], dim=1).flatten(0, 1)




@contextlib.contextmanager
def circular_padding(modules: Sequence[nn.Module], tiling: str) -> Iterator[None]:
    """Wrap-around padding on every padded Conv2d while inside the block (seamless textures).

    ``tiling``: ``xy`` | ``x`` | ``y`` | ``none``. Uses forward pre-hooks and restores each conv's padding on
    exit, instead of replacing ``_conv_forward`` for good as the authors do.
    """
    if tiling == "none":
        yield
        return
    wrap_x, wrap_y = "x" in tiling, "y" in tiling
    saved: list[tuple[nn.Conv2d, Any, Any]] = []

    def make_hook(pad_h: int, pad_w: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            x = F.pad(x, (pad_w, pad_w, 0, 0), mode="circular" if wrap_x else "constant")
            x = F.pad(x, (0, 0, pad_h, pad_h), mode="circular" if wrap_y else "constant")
            return (x, *args[1:])

        return hook

    try:
        for root in modules:
            for conv in root.modules():
                if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros":
                    continue
                if isinstance(conv.padding, str) or conv.padding == (0, 0):
                    continue
                pad_h, pad_w = conv.padding
                handle = conv.register_forward_pre_hook(make_hook(pad_h, pad_w))
                saved.append((conv, conv.padding, handle))
                conv.padding = (0, 0)
        yield
    finally:
        for conv, padding, handle in saved:
            handle.remove()
            conv.padding = padding
