"""Attention Distillation (Zhou et al., CVPR 2025) on Stable Diffusion 1.5 / SDXL UNets.

The AD loss compares a latent's self-attention output ``Attn(Q, K, V)`` with the "ideal" stylised output
``Attn(Q, K_s, V_s)`` (style keys/values, detached) at a few decoder layers; the latent itself is optimised with
Adam. Two drivers use it: :func:`optimize` (style transfer / texture from clean latents over a timestep schedule)
and :func:`sample` (AD-guided DDIM sampling with CFG), plus :func:`panorama` (MultiDiffusion windows).

Two modes (research/ad.md; fixtures in shared/fixtures/ad-reference):
- reference (``fast=False``, fp32): the authors' order of random draws, batch shapes and operations, so that with
  one CPU thread the fixtures are reproduced;
- fast (``fast=True``, bf16 autocast by default on CUDA): style features for many timesteps in one batched
  forward, forwards stop after the last AD layer, target attention under ``no_grad``, ``expand`` instead of
  ``repeat``, gradient checkpointing for SDXL. It keeps the method: the same random draws, and the content query
  from a forward shaped like the latents' own (the exact q = q_c tie at the first iteration); in fp32 it differs
  from reference mode only by floating-point reassociation. Deviations from the authors' code: docs/ad.md.

Every random draw comes from the item's ``torch.Generator`` (CPU), in the reference order: the initial latent,
then per AD step AdaIN noise, style noise, content noise.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from operators.attention import AttentionTap, LayerFeatures, install_tap
from operators.models import resolve_model

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# ------------------------------------------------------------------------------------------------------------
# losses


def ad_loss(
    q_list: Sequence[torch.Tensor],
    ks_list: Sequence[torch.Tensor],
    vs_list: Sequence[torch.Tensor],
    out_list: Sequence[torch.Tensor],
    scale: float = 1.0,
) -> torch.Tensor:
    """AD loss as the authors compute it: per layer mean L1(out, Attn(q, Ks, Vs).detach()), summed over layers.

    ``q``/``out``: ``(B, h, N, d)`` of the optimised latent; ``ks``/``vs``: ``(S, h, Ns, d)``, the S style images
    concatenated on the key axis so every query attends jointly over all style tokens.
    """
    loss: torch.Tensor | float = 0.0
    for q, ks, vs, out in zip(q_list, ks_list, vs_list, out_list, strict=True):
        styles, batch = ks.shape[0], q.shape[0]
        k_style = torch.cat(ks.chunk(styles, dim=0), dim=2).repeat(batch, 1, 1, 1)
        v_style = torch.cat(vs.chunk(styles, dim=0), dim=2).repeat(batch, 1, 1, 1)
        target = F.scaled_dot_product_attention(q * scale, k_style, v_style)
        loss = loss + F.l1_loss(out, target.detach())
    return loss  # type: ignore[return-value]


def content_loss(q_list: Sequence[torch.Tensor], qc_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """Query content loss: per layer mean L1(q, q_content), summed; ``q_content`` broadcasts over the batch."""
    loss: torch.Tensor | float = 0.0
    for q, qc in zip(q_list, qc_list, strict=True):
        loss = loss + F.l1_loss(q, qc.detach().expand_as(q))
    return loss  # type: ignore[return-value]


def concat_style_kv(ks: torch.Tensor, vs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, h, N, d)`` style K/V -> ``(1, h, S*N, d)``, ready to ``expand`` over a batch (fast path)."""
    styles, heads, tokens, dim = ks.shape
    join = lambda x: x.transpose(0, 1).reshape(1, heads, styles * tokens, dim)  # noqa: E731
    return join(ks), join(vs)


def ad_loss_fast(
    feats: Sequence[LayerFeatures], style_kv: Sequence[tuple[torch.Tensor, torch.Tensor]], scale: float = 1.0
) -> torch.Tensor:
    """Same value as :func:`ad_loss` with pre-joined style K/V: no copies, no graph for the target, fp32 L1."""
    loss: torch.Tensor | float = 0.0
    for feat, (k_style, v_style) in zip(feats, style_kv, strict=True):
        batch = feat.q.shape[0]
        with torch.no_grad():
            target = F.scaled_dot_product_attention(
                feat.q * scale,
                k_style.expand(batch, -1, -1, -1).to(feat.q.dtype),
                v_style.expand(batch, -1, -1, -1).to(feat.q.dtype),
            )
        loss = loss + (feat.out.float() - target.float()).abs().mean()
    return loss  # type: ignore[return-value]


def adain(source: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Match per-channel mean/std of ``source`` (per sample) to those of ``target`` (pooled over its batch)."""
    s_mean, s_std = source.mean(dim=(2, 3), keepdim=True), source.std(dim=(2, 3), keepdim=True)
    t_mean, t_std = target.mean(dim=(0, 2, 3), keepdim=True), target.std(dim=(0, 2, 3), keepdim=True)
    return (source - s_mean) / (s_std + eps) * t_std + t_mean


# ------------------------------------------------------------------------------------------------------------
# model


@dataclass
class Cond:
    """UNet conditioning for one sample; ``batch(n)`` repeats it (SDXL also needs pooled text and time ids)."""

    embeds: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def batch(self, n: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": torch.cat([self.embeds] * n)}
        if self.text_embeds is not None:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.cat([self.text_embeds] * n),
                "time_ids": torch.cat([self.time_ids] * n),
            }
        return kwargs


@dataclass
class ADModel:
    """A loaded SD1.5/SDXL pipeline with the attention tap installed, in one precision on one device."""

    pipe: Any
    spec: str
    is_xl: bool
    device: torch.device
    dtype: torch.dtype
    tap: AttentionTap

    @property
    def unet(self) -> nn.Module:
        return self.pipe.unet

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """Pixel size the UNet was built for (sample_size latents)."""
        return int(self.unet.config.sample_size) * self.vae_scale

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this so every UNet down/up-sampling lines up."""
        return self.vae_scale * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def default_layers(self, count: int = 6) -> tuple[int, int]:
        """The authors' choice: the last six self-attention layers (SD1.5 10..15, SDXL 64..69)."""
        n = self.tap.num_self_layers
        return (max(n - count, 0), n)

    def scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.pipe.scheduler.config)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(N,3,H,W)`` in [0,1] -> VAE posterior means x scaling factor, one image at a time (as VAE slicing)."""
        vae_dtype = next(self.vae.parameters()).dtype
        out = []
        for image in images.split(1):
            image = image.to(device=self.device, dtype=vae_dtype) * 2.0 - 1.0
            out.append(self.vae.encode(image)["latent_dist"].mean * self.vae.config.scaling_factor)
        return torch.cat(out).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        out = []
        for latent in latents.split(1):
            latent = latent.to(device=self.device, dtype=vae_dtype) / self.vae.config.scaling_factor
            out.append(self.vae.decode(latent)[0])
        return (torch.cat(out).float() * 0.5 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def null_cond(self, height: int, width: int) -> Cond:
        """Empty-prompt conditioning used by every AD feature pass (no CFG)."""
        if not self.is_xl:
            embeds = self.pipe.encode_prompt("", self.device, 1, False)[0]
            return Cond(embeds)
        embeds, _, pooled, _ = self.pipe.encode_prompt("", device=self.device)
        return Cond(embeds, pooled, self._time_ids(height, width, embeds.dtype))

    @torch.no_grad()
    def prompt_cond(
        self, prompt: str, negative_prompt: str, num_images: int, do_cfg: bool, height: int, width: int
    ) -> Cond:
        """Conditioning of the main denoising pass: ``[negative; positive]`` batches when ``do_cfg``."""
        if not self.is_xl:
            pos, neg = self.pipe.encode_prompt(prompt, self.device, num_images, do_cfg, negative_prompt)
            return Cond(torch.cat([neg, pos]) if do_cfg else pos)
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompt,
            device=self.device,
            num_images_per_prompt=num_images,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt,
        )
        time_ids = self._time_ids(height, width, pos.dtype)
        if do_cfg:
            return Cond(torch.cat([neg, pos]), torch.cat([neg_pooled, pooled]), time_ids.repeat(2 * num_images, 1))
        return Cond(pos, pooled, time_ids.repeat(num_images, 1))

    def _time_ids(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        # SDXL micro-conditioning: original size, crop top-left, target size (pixels).
        return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=self.device)

    def features(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, Any],
        layers: Sequence[int],
        *,
        stop_early: bool = False,
    ) -> list[LayerFeatures]:
        """One UNet forward of ``latents`` at ``t`` recording the AD layers' q/k/v/out (grad follows the caller)."""
        latents, t = latents.to(self.device), t.to(self.device) if torch.is_tensor(t) else t
        with self.tap.capture(layers, stop_early=stop_early), self.autocast():
            return self.tap.run(lambda: self.unet(latents, t, return_dict=False, **cond))

    def eps(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        t = t.to(self.device) if torch.is_tensor(t) else t
        with self.autocast():
            return self.unet(latents, t, return_dict=False, **cond)[0].float()


_MODEL_CACHE: dict[tuple[str, str, str, bool], ADModel] = {}


def is_sdxl(spec: str) -> bool:
    """Whether ``spec`` is an SDXL-family pipeline (it has a second text encoder), from model_index.json."""
    from diffusers import DiffusionPipeline

    return "text_encoder_2" in DiffusionPipeline.load_config(resolve_model(spec))


def load_ad_model(spec: str, device: str = "cpu", precision: str = "fp32", checkpointing: bool = False) -> ADModel:
    """Load (once per process) an SD1.5/SDXL pipeline from a hub id, a local directory or ``tiny:<kind>``."""
    key = (spec, str(device), precision, checkpointing)
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    path = resolve_model(spec)
    is_xl = is_sdxl(spec)
    dtype = DTYPES[precision]
    # Decoded pixels are the product: the VAE stays fp32 in every precision.
    kwargs: dict[str, Any] = {"use_safetensors": True, "dtype": {"default": dtype, "vae": torch.float32}}
    if is_xl:
        pipe = StableDiffusionXLPipeline.from_pretrained(path, **kwargs)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            path, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kwargs
        )
    dev = torch.device(device)
    pipe.to(dev)
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.requires_grad_(False).eval()
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    pipe.set_progress_bar_config(disable=True)
    tap = install_tap(pipe.unet)
    model = ADModel(pipe=pipe, spec=spec, is_xl=is_xl, device=dev, dtype=dtype, tap=tap)
    log.info("loaded %s (%s, %d self-attention layers, %s on %s)", spec, "sdxl" if is_xl else "sd",
             tap.num_self_layers, precision, device)
    _MODEL_CACHE[key] = model
    return model


# ------------------------------------------------------------------------------------------------------------
# drivers


@dataclass
class ADConfig:
    """Knobs shared by the drivers; ``layers`` is a half-open range of self-attention indices (execution order)."""

    layers: tuple[int, int]
    lr: float = 0.05
    iters: int = 1
    steps: int = 50
    content_weight: float = 0.0
    attn_scale: float = 1.0
    fast: bool = False
    feature_chunk: int = 8  # AD timesteps per batched style/content forward (fast mode)

    @property
    def layer_ids(self) -> list[int]:
        return list(range(*self.layers))


@dataclass
class ADRun:
    """Final latents plus the loss of every Adam iteration (total and AD part)."""

    latents: torch.Tensor
    losses: list[float] = field(default_factory=list)
    ad_losses: list[float] = field(default_factory=list)

    @property
    def final_ad_loss(self) -> float | None:
        return self.ad_losses[-1] if self.ad_losses else None


@dataclass
class _Request:
    """Inputs of one AD step's target features: style latents (S) and optional content latent (1) at ``t``."""

    t: torch.Tensor
    style: torch.Tensor
    content: torch.Tensor | None


@dataclass
class _Targets:
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # reference: raw (S,h,N,d); fast: joined (1,h,S*N,d)
    qc: list[torch.Tensor] | None


class _TargetFeatures:
    """Style K/V (and content Q) for a sequence of AD steps, consumed in order.

    Reference mode runs the authors' separate style and content forwards per step; fast mode runs
    ``feature_chunk`` steps' style latents as one batch with per-sample timesteps. The content query comes, in
    both modes, from a forward shaped exactly like the optimised latents' own (``rows`` copies, same code path),
    so that at the first iteration, where the latent *is* the content latent, q equals q_c bit for bit: the
    content loss and its L1 subgradient are exactly 0, as in the authors' code (a batched forward would leave
    rounding noise whose signs Adam's first step follows).
    """

    def __init__(self, model: ADModel, cfg: ADConfig, null: Cond, requests: Sequence[_Request],
                 rows: int = 1) -> None:
        self.model, self.cfg, self.null, self.requests, self.rows = model, cfg, null, list(requests), rows
        self._cache: dict[int, _Targets] = {}

    def __getitem__(self, i: int) -> _Targets:
        if i not in self._cache:
            self._cache.clear()
            end = min(i + (self.cfg.feature_chunk if self.cfg.fast else 1), len(self.requests))
            with torch.no_grad():
                if self.cfg.fast:
                    self._cache.update(self._batched(i, end))
                else:
                    self._cache[i] = self._single(self.requests[i])
        return self._cache[i]

    def _single(self, req: _Request) -> _Targets:
        layers = self.cfg.layer_ids
        style = self.model.features(req.style, req.t, self.null.batch(req.style.shape[0]), layers)
        qc = None
        if req.content is not None:
            qc = [f.q for f in self.model.features(req.content, req.t, self.null.batch(1), layers)]
        return _Targets([(f.k, f.v) for f in style], qc)

    def _content_q(self, req: _Request) -> list[torch.Tensor]:
        content = req.content.expand(self.rows, *req.content.shape[1:])
        feats = self.model.features(content, req.t, self.null.batch(self.rows), self.cfg.layer_ids, stop_early=True)
        return [f.q[:1] for f in feats]

    def _batched(self, start: int, end: int) -> dict[int, _Targets]:
        reqs = self.requests[start:end]
        rows = [r.style for r in reqs]
        per = [x.shape[0] for x in rows]
        t = torch.cat([r.t.reshape(1).expand(n) for r, n in zip(reqs, per, strict=True)]).to(self.model.device)
        feats = self.model.features(torch.cat(rows), t, self.null.batch(sum(per)), self.cfg.layer_ids,
                                    stop_early=True)
        out, offset = {}, 0
        for i, (req, n) in enumerate(zip(reqs, per, strict=True)):
            kv = [concat_style_kv(f.k[offset:offset + n], f.v[offset:offset + n]) for f in feats]
            out[start + i] = _Targets(kv, self._content_q(req) if req.content is not None else None)
            offset += n
        return out


def _descend(
    model: ADModel,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, Any],
    targets: _Targets,
    cfg: ADConfig,
    optimizer: torch.optim.Optimizer,
    run: ADRun,
) -> None:
    """``cfg.iters`` Adam steps on ``x`` against one step's targets."""
    for _ in range(cfg.iters):
        optimizer.zero_grad()
        feats = model.features(x, t, cond, cfg.layer_ids, stop_early=cfg.fast)
        if cfg.fast:
            style = ad_loss_fast(feats, targets.kv, cfg.attn_scale)
        else:
            style = ad_loss([f.q for f in feats], [k for k, _ in targets.kv], [v for _, v in targets.kv],
                            [f.out for f in feats], scale=cfg.attn_scale)
        loss = style
        if targets.qc is not None:
            q_list, qc_list = [f.q for f in feats], targets.qc
            if cfg.fast:  # reduce in fp32 whatever the autocast dtype
                q_list, qc_list = [q.float() for q in q_list], [qc.float() for qc in qc_list]
            loss = style + content_loss(q_list, qc_list) * cfg.content_weight
        loss.backward()
        optimizer.step()
        run.losses.append(loss.detach())
        run.ad_losses.append(style.detach())


def _finish(run: ADRun) -> ADRun:
    run.losses = [float(v) for v in run.losses]
    run.ad_losses = [float(v) for v in run.ad_losses]
    return run


def _randn(generator: torch.Generator, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Draw on the CPU generator (device-independent numbers), then move."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


def optimize(
    model: ADModel,
    style: torch.Tensor,
    content: torch.Tensor | None,
    *,
    num_images: int,
    height: int,
    width: int,
    cfg: ADConfig,
    generator: torch.Generator,
) -> ADRun:
    """Optimisation-based transfer/texture: Adam on clean latents over a decreasing timestep schedule.

    ``style``: ``(S,4,h,w)`` latents; ``content``: ``(1,4,h,w)`` or None; ``height``/``width`` in latent pixels.
    One randn for the initial latent is always drawn, even when the content latent replaces it.
    """
    channels = model.unet.config.in_channels
    latents = _randn(generator, (num_images, channels, height, width), model.device)
    null = model.null_cond(height * model.vae_scale, width * model.vae_scale)
    if content is not None:
        latents = torch.cat([content.clone()] * num_images)
    scheduler = model.scheduler()
    scheduler.set_timesteps(cfg.steps)
    timesteps = list(scheduler.timesteps)
    targets = _TargetFeatures(model, cfg, null, [_Request(t, style, content) for t in timesteps], rows=num_images)
    latents = latents.detach().float().requires_grad_()
    optimizer = torch.optim.Adam([latents], lr=cfg.lr)
    cond = null.batch(num_images)
    run = ADRun(latents)
    for i, t in enumerate(timesteps):
        _descend(model, latents, t, cond, targets[i], cfg, optimizer, run)
    run.latents = latents.detach()
    return _finish(run)


def _ad_timestep(t: torch.Tensor, scheduler) -> torch.Tensor:
    """Level of x_{t-1}: ``max(t - T // N, 0)`` as the authors compute it (a tensor either way)."""
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    zero = torch.tensor([0], device=t.device)
    return max(prev, zero)


@dataclass
class _StepNoise:
    adain: torch.Tensor | None
    style: torch.Tensor
    content: torch.Tensor | None


def _draw_step_noise(
    generator: torch.Generator, style: torch.Tensor, content: torch.Tensor | None, adain_on: bool, device
) -> _StepNoise:
    # Order matters for reproducing the reference: AdaIN noise, style noise, content noise.
    a = _randn(generator, style.shape, device) if adain_on else None
    s = _randn(generator, style.shape, device)
    c = _randn(generator, content.shape, device) if content is not None else None
    return _StepNoise(a, s, c)


def _ad_refine(
    model: ADModel,
    x: torch.Tensor,
    t_ad: torch.Tensor,
    targets: _Targets,
    adain_target: torch.Tensor | None,
    null: Cond,
    cfg: ADConfig,
    run: ADRun,
) -> torch.Tensor:
    """One AD-guided refinement of x_{t-1}: optional AdaIN, then a fresh Adam for ``iters`` steps."""
    if adain_target is not None:
        x = adain(x, adain_target)
    x = x.detach().requires_grad_()
    optimizer = torch.optim.Adam([x], lr=cfg.lr)
    _descend(model, x, t_ad, null.batch(x.shape[0]), targets, cfg, optimizer, run)
    return x.detach()


def sample(
    model: ADModel,
    style: torch.Tensor,
    content: torch.Tensor | None,
    *,
    prompt: str,
    negative_prompt: str,
    num_images: int,
    height: int,
    width: int,
    guidance_scale: float,
    adain_on: bool,
    cfg: ADConfig,
    generator: torch.Generator,
    start_time: float = 999,
    init_from_style: bool = False,
) -> ADRun:
    """AD-guided sampling: after every DDIM step (eta 0, CFG) at a timestep ``t < start_time``, optimise x_{t-1}
    against style noised to t-1. The authors' default 999 exceeds every timestep (AD after every step); they advise
    a lower one to delay AD and protect the structure of early steps. Skipped steps draw no noise, as theirs.
    ``init_from_style`` (the authors' SDXL option) starts from the style latent noised to t = 999 instead of pure
    noise (image i from style i mod S; the authors' code stacks every style for every image)."""
    scheduler = model.scheduler()
    do_cfg = guidance_scale > 1.0
    px_h, px_w = height * model.vae_scale, width * model.vae_scale
    cond = model.prompt_cond(prompt, negative_prompt, num_images, do_cfg, px_h, px_w).batch(1)
    channels = model.unet.config.in_channels
    latents = _randn(generator, (num_images, channels, height, width), model.device) * scheduler.init_noise_sigma
    if init_from_style:
        if tuple(style.shape[-2:]) != (height, width):
            raise ValueError(f"init_from_style needs the output size of the style latents ({style.shape[-1]}x"
                             f"{style.shape[-2]} latent px), got {width}x{height}")
        init = style[torch.arange(num_images) % style.shape[0]]
        latents = scheduler.add_noise(init, _randn(generator, init.shape, model.device), torch.tensor([999]))
    scheduler.set_timesteps(cfg.steps)
    timesteps = list(scheduler.timesteps)
    null = model.null_cond(px_h, px_w)
    active = [i for i, t in enumerate(timesteps) if cfg.iters > 0 and t < start_time]  # steps followed by AD
    t_ads = {i: _ad_timestep(timesteps[i], scheduler) for i in active}
    noises = {i: _draw_step_noise(generator, style, content, adain_on, model.device) for i in active}
    requests = [
        _Request(t_ads[i], scheduler.add_noise(style, noises[i].style, t_ads[i]),
                 scheduler.add_noise(content, noises[i].content, t_ads[i]) if content is not None else None)
        for i in active
    ]
    targets = _TargetFeatures(model, cfg, null, requests)
    position = {i: k for k, i in enumerate(active)}
    run = ADRun(latents)
    for i, t in enumerate(timesteps):
        with torch.no_grad():
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            eps = model.eps(model_input, t, cond)
            if do_cfg:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
        if i in position:
            adain_target = scheduler.add_noise(style, noises[i].adain, t_ads[i]) if adain_on else None
            latents = _ad_refine(model, latents, t_ads[i], targets[position[i]], adain_target, null, cfg, run)
    run.latents = latents
    return _finish(run)


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
    latents = _randn(generator, (num_images, channels, height, width), model.device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(cfg.steps)
    timesteps = list(scheduler.timesteps)
    t_ads = [_ad_timestep(t, scheduler) for t in timesteps]
    per_step = len(batches)
    noises = [[_draw_step_noise(generator, style, None, adain_on, model.device) for _ in range(per_step)]
              for _ in timesteps]
    requests = [_Request(ta, scheduler.add_noise(style, n.style, ta), None)
                for ta, step in zip(t_ads, noises, strict=True) for n in step]
    targets = _TargetFeatures(model, cfg, null, requests)
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
                denoised = _ad_refine(model, denoised, t_ads[i], targets[k], adain_target, null, cfg, run)
            for crop, (h0, h1, w0, w1) in zip(denoised.chunk(len(batch)), batch, strict=True):
                value[:, :, h0:h1, w0:w1] += crop
                count[:, :, h0:h1, w0:w1] += 1
        latents = torch.where(count > 0, value / count, value)
    run.latents = latents
    return _finish(run)


def _pair_rows(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None:
        return None
    neg, pos = x.chunk(2)
    return torch.stack([neg, pos], dim=1).flatten(0, 1)


# ------------------------------------------------------------------------------------------------------------
# seamless tiling


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


# ------------------------------------------------------------------------------------------------------------
# operators


def pil_to_tensor(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL -> ``(1,3,H,W)`` float32 in [0,1] (bicubic resize to ``size`` = (width, height) when it differs)."""
    image = image.convert("RGB")
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0).float().div(255)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(N,3,H,W)`` in [0,1] -> PIL images (same rounding as torchvision's save_image)."""
    array = images.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


_COMMON = {"method", "steps", "lr", "iters", "layers", "size", "num_images", "precision", "attn_scale", "fast",
           "feature_chunk", "gradient_checkpointing"}

# Params that only some (operator kind, method) pairs read: given elsewhere they would be ignored, so they are an
# error. ``guidance_scale`` is not offered for textures: their prompt is empty, so CFG would only double the work.
_APPLIES: dict[str, set[tuple[str, str]]] = {
    "content_weight": {("transfer", "optimize"), ("transfer", "sample")},
    "adain": {("t2i", "sample"), ("transfer", "sample"), ("texture", "sample"), ("texture", "panorama")},
    "guidance_scale": {("t2i", "sample"), ("transfer", "sample")},
    "negative_prompt": {("t2i", "sample"), ("transfer", "sample")},
    "tiling": {("texture", "optimize"), ("texture", "sample"), ("texture", "panorama")},
    "stride": {("texture", "panorama")},
    "start_time": {("t2i", "sample"), ("transfer", "sample"), ("texture", "sample")},
    "init_from_style": {("t2i", "sample")},
    "view_batch_size": {("texture", "panorama")},
}

# (operator kind, method) -> defaults (research/ad.md §3-§5).
_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
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
_XL_T2I = {"iters": 2, "guidance_scale": 7.0}  # ad.ipynb cell 13


class _ADOperator:
    """Shared operator plumbing: parse params once, load the model once, one result dict per item.

    Params (defaults per operator and method in ``_DEFAULTS``): ``method``, ``steps``, ``lr``, ``iters``,
    ``content_weight``, ``layers`` ([start, end) self-attention indices in execution order; default the last
    six), ``size`` (int or [width, height]; default the model's native size, 2x wide for panorama),
    ``num_images``, ``precision`` (fp32 = reference mode; bf16 = fast mode, default on CUDA). Advanced:
    ``fast`` (fast code path in any precision), ``feature_chunk``, ``gradient_checkpointing`` (default on for
    SDXL in fast mode), ``attn_scale``. Style images are resized to the native square size, content to ``size``.
    """

    name = "ad"
    kind = "t2i"
    methods: tuple[str, ...] = ("sample",)

    @classmethod
    def check_params(cls, params: dict[str, Any] | None) -> None:
        """Refuse, without loading anything, a param that is unknown or that this operator and method would
        ignore (one line naming it)."""
        params = dict(params or {})
        method = params.get("method", cls.methods[0])
        if method not in cls.methods:
            raise ValueError(f"{cls.name}: method must be one of {list(cls.methods)}, got {method!r}")
        known = _COMMON | {p for p, where in _APPLIES.items() if any(kind == cls.kind for kind, _ in where)}
        for param in sorted(params):
            if param not in known:
                raise ValueError(f"{cls.name}: unknown param {param!r}; known: {', '.join(sorted(known))}")
            if param in _APPLIES and (cls.kind, method) not in _APPLIES[param]:
                raise ValueError(f"{cls.name}: param {param!r} does not apply to method {method!r}")
        fast = params.get("fast")
        if "feature_chunk" in params and (fast is False or (fast is None and params.get("precision") == "fp32")):
            raise ValueError(f"{cls.name}: param 'feature_chunk' applies to the fast mode only (fast: true, or a "
                             "precision other than fp32)")

    def __init__(self, model: str, params: dict[str, Any] | None = None, device: str = "cpu") -> None:
        params = dict(params or {})
        self.check_params(params)
        method = params.get("method", self.methods[0])
        precision = params.get("precision") or ("bf16" if str(device).startswith("cuda") else "fp32")
        fast = bool(params.get("fast", precision != "fp32"))
        self.model_spec = model
        checkpointing = bool(params.get("gradient_checkpointing", fast and is_sdxl(model)))
        self.model = load_ad_model(model, device, precision, checkpointing)
        settings = dict(_DEFAULTS[(self.kind, method)])
        if self.kind == "t2i" and self.model.is_xl:
            settings.update(_XL_T2I)
        settings.update({k: v for k, v in params.items() if v is not None})
        settings.update(method=method, precision=precision, fast=fast, gradient_checkpointing=checkpointing)
        settings["layers"] = self._layers(params.get("layers"))
        settings["size"] = self._size(params.get("size"), method)
        settings["num_images"] = int(params.get("num_images", 1))
        if settings["num_images"] < 1:
            raise ValueError(f"{self.name}: num_images must be >= 1")
        self.settings = settings

    def _layers(self, layers: Any) -> tuple[int, int]:
        n = self.model.tap.num_self_layers
        if layers is None:
            return self.model.default_layers()
        start, end = (int(v) for v in layers)
        if not 0 <= start < end <= n:
            raise ValueError(f"{self.name}: layers must be a range [start, end) within [0, {n}], got {layers}")
        return (start, end)

    def _size(self, size: Any, method: str) -> tuple[int, int]:
        native = self.model.native_size
        if size is None:
            width, height = (2 * native, native) if method == "panorama" else (native, native)
        elif isinstance(size, int):
            width = height = size
        else:
            width, height = (int(v) for v in size)
        multiple = self.model.size_multiple
        if width % multiple or height % multiple or width <= 0 or height <= 0:
            raise ValueError(f"{self.name}: size {width}x{height} must be positive multiples of {multiple}")
        return (width, height)

    def config(self) -> ADConfig:
        s = self.settings
        return ADConfig(layers=s["layers"], lr=float(s["lr"]), iters=int(s["iters"]), steps=int(s["steps"]),
                        content_weight=float(s.get("content_weight", 0.0)),
                        attn_scale=float(s.get("attn_scale", 1.0)), fast=s["fast"],
                        feature_chunk=int(s.get("feature_chunk", 8)))

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self._one(item) for item in items]

    def _styles(self, item: dict[str, Any]) -> list[Image.Image]:
        style = item.get("style")
        styles = [s for s in (style if isinstance(style, list | tuple) else [style]) if s is not None]
        return styles

    def _one(self, item: dict[str, Any]) -> dict[str, Any]:
        key = item.get("key")
        styles = self._styles(item)
        if not styles:
            return {"key": key, "error": f"{self.name}: no style image"}
        problem = self._missing(item)
        if problem:
            return {"key": key, "error": problem}
        seed = int(item.get("seed") or 0)
        started = time.perf_counter()
        native = self.model.native_size
        style = torch.cat([pil_to_tensor(s, (native, native)) for s in styles])
        with circular_padding([self.model.unet, self.model.vae], self.settings.get("tiling", "none")):
            style_latents = self.model.encode_images(style)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            run = self._run(item, style_latents, generator)
            images = tensor_to_pil(self.model.decode_latents(run.latents))
        meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.settings.items()}
        meta.update(operator=self.name, model=self.model_spec, seed=seed, num_styles=len(styles),
                    final_ad_loss=run.final_ad_loss, final_loss=run.losses[-1] if run.losses else None,
                    seconds=round(time.perf_counter() - started, 3))
        if self.kind == "t2i":
            meta["prompt"] = item.get("prompt") or ""
        result = {"key": key, "image": images[0], "meta": meta}
        if len(images) > 1:
            result["images"] = images
        return result

    def _missing(self, item: dict[str, Any]) -> str | None:
        return None

    def _latent_size(self) -> tuple[int, int]:
        width, height = self.settings["size"]
        return height // self.model.vae_scale, width // self.model.vae_scale

    def _run(self, item: dict[str, Any], style: torch.Tensor, generator: torch.Generator) -> ADRun:
        raise NotImplementedError


# FLUX (``ad-t2i`` only): the params ``flux_ad_sample`` reads, and the authors' notebook defaults.
_FLUX_PARAMS = {"method", "steps", "lr", "iters", "layers", "size", "guidance_scale", "start_time",
                "max_sequence_length", "adain", "num_images", "precision", "gradient_checkpointing"}
_FLUX_DEFAULTS: dict[str, Any] = {"steps": 28, "lr": 0.01, "iters": 2, "guidance_scale": 3.5, "start_time": 9999,
                                  "max_sequence_length": 512, "adain": True, "num_images": 1, "precision": "fp32",
                                  "gradient_checkpointing": False}
_FLUX_LAST_CALLS = 7  # default layers: the last 7 joint-attention calls, (50, 57) on FLUX.1-dev


def flux_kind(spec: str | None, *, offline: bool = False) -> bool | None:
    """Whether ``spec`` is a text-to-image FLUX pipeline (model_index.json ``_class_name`` FluxPipeline).

    ``offline``: decide without building or downloading anything (config time): ``tiny:<kind>`` and local
    directories are answered, a hub id gives None (unknown)."""
    from operators.models import TINY_PREFIX, looks_local

    if spec is None:
        return None
    if spec.startswith(TINY_PREFIX):
        return spec[len(TINY_PREFIX):].partition("@")[0] == "flux"
    if offline:
        import json
        import os

        index = os.path.join(os.path.expanduser(spec), "model_index.json")
        if not (looks_local(spec) and os.path.isfile(index)):
            return None
        with open(index) as f:
            return json.load(f).get("_class_name") == "FluxPipeline"
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(resolve_model(spec)).get("_class_name") == "FluxPipeline"


_FLUX_CACHE: dict[str, Any] = {}


def load_flux_model(spec: str):
    """Load (once per process) a FLUX pipeline through :func:`operators.ad_flux.load_flux_pipeline` (CPU, fp32)."""
    if spec not in _FLUX_CACHE:
        from operators.ad_flux import load_flux_pipeline

        _FLUX_CACHE[spec] = load_flux_pipeline(resolve_model(spec))
    return _FLUX_CACHE[spec]


class ADText2Image(_ADOperator):
    """``ad-t2i``: prompt + style image(s) -> AD-guided sampling with CFG (and AdaIN by default).

    On a FLUX model (docs/ad.md, "FLUX") it runs :func:`operators.ad_flux.flux_ad_sample` instead of the UNet path.
    """

    name, kind, methods = "ad-t2i", "t2i", ("sample",)

    @classmethod
    def check_params(cls, params: dict[str, Any] | None, model: str | None = None) -> None:
        """As :meth:`_ADOperator.check_params`; with ``model`` known to be FLUX, against the FLUX params. With a
        model not known offline (a hub id, or none given), ``max_sequence_length`` is let through here and the
        check is completed when the operator is built."""
        params = dict(params or {})
        flux = flux_kind(model, offline=True)
        if flux:
            return cls._check_flux(params)
        if flux is None:
            params.pop("max_sequence_length", None)
        elif "max_sequence_length" in params:
            raise ValueError(f"{cls.name}: param 'max_sequence_length' applies to FLUX models only")
        super().check_params(params)

    @classmethod
    def _check_flux(cls, params: dict[str, Any]) -> None:
        for param in sorted(params):
            if param not in _FLUX_PARAMS:
                raise ValueError(f"{cls.name}: param {param!r} does not apply to FLUX models; FLUX params: "
                                 f"{', '.join(sorted(_FLUX_PARAMS))}")
        if params.get("method", "sample") != "sample":
            raise ValueError(f"{cls.name}: method must be 'sample' on FLUX, got {params['method']!r}")
        if params.get("precision", "fp32") != "fp32":
            raise ValueError(f"{cls.name}: precision must be 'fp32' on FLUX (no fast/bf16 mode yet), got "
                             f"{params['precision']!r}")

    def __init__(self, model: str, params: dict[str, Any] | None = None, device: str = "cpu") -> None:
        params = dict(params or {})
        self.flux = bool(flux_kind(model))
        if not self.flux:
            if "max_sequence_length" in params:
                raise ValueError(f"{self.name}: param 'max_sequence_length' applies to FLUX models only")
            super().__init__(model, params, device)
            return
        self._check_flux(params)
        if not str(device).startswith("cpu"):
            log.warning("%s: FLUX AD runs on the CPU in fp32 for now (device %s not used)", self.name, device)
        self.model_spec = model
        self.pipe = load_flux_model(model)
        settings = dict(_FLUX_DEFAULTS)
        settings.update({k: v for k, v in params.items() if v is not None})
        settings["method"] = "sample"
        calls = len(self.pipe.transformer.transformer_blocks) + len(self.pipe.transformer.single_transformer_blocks)
        layers = params.get("layers")
        if layers is None:
            settings["layers"] = (max(calls - _FLUX_LAST_CALLS, 0), calls)
        else:
            start, end = (int(v) for v in layers)
            if not 0 <= start < end <= calls:
                raise ValueError(f"{self.name}: layers must be a range [start, end) within [0, {calls}] "
                                 f"(joint-attention calls, double- then single-stream), got {layers}")
            settings["layers"] = (start, end)
        multiple = 2 * self.pipe.vae_scale_factor  # 2x2 latent packing
        size = params.get("size")
        if size is None:
            width = height = int(self.pipe.default_sample_size) * self.pipe.vae_scale_factor
        elif isinstance(size, int):
            width = height = size
        else:
            width, height = (int(v) for v in size)
        if width % multiple or height % multiple or width <= 0 or height <= 0:
            raise ValueError(f"{self.name}: size {width}x{height} must be positive multiples of {multiple}")
        settings["size"] = (width, height)
        settings["num_images"] = int(settings["num_images"])
        if settings["num_images"] < 1:
            raise ValueError(f"{self.name}: num_images must be >= 1")
        for name, kind in (("steps", int), ("iters", int), ("max_sequence_length", int)):
            settings[name] = kind(settings[name])
            if settings[name] < 1:
                raise ValueError(f"{self.name}: {name} must be >= 1")
        self.settings = settings

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not self.flux:
            return super().__call__(items)
        return [self._one_flux(item) for item in items]

    def _one_flux(self, item: dict[str, Any]) -> dict[str, Any]:
        """Images 0..n-1 drawn one after another from the item's generator; image 0 is exactly
        ``flux_ad_sample`` with that generator."""
        from operators.ad_flux import flux_ad_sample

        key = item.get("key")
        styles = self._styles(item)
        if not styles:
            return {"key": key, "error": f"{self.name}: no style image"}
        s = self.settings
        seed = int(item.get("seed") or 0)
        started = time.perf_counter()
        width, height = s["size"]
        style = torch.cat([pil_to_tensor(im, (width, height)) for im in styles])
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images, losses = [], []
        for _ in range(s["num_images"]):
            _, image, trace = flux_ad_sample(
                self.pipe, style, item.get("prompt") or "", height=height, width=width, steps=s["steps"],
                lr=float(s["lr"]), iters=s["iters"], layers=s["layers"], guidance_scale=float(s["guidance_scale"]),
                start_time=float(s["start_time"]), max_sequence_length=s["max_sequence_length"],
                generator=generator, gradient_checkpointing=bool(s["gradient_checkpointing"]),
                adain_on=bool(s["adain"]))
            images.extend(tensor_to_pil(image))
            if trace["losses"] is not None:
                losses.append(float(trace["losses"][-1, -1]))
        meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}
        meta.update(operator=self.name, model=self.model_spec, family="flux", seed=seed, num_styles=len(styles),
                    final_ad_loss=losses[-1] if losses else None, prompt=item.get("prompt") or "",
                    seconds=round(time.perf_counter() - started, 3))
        result = {"key": key, "image": images[0], "meta": meta}
        if len(images) > 1:
            result["images"] = images
        return result

    def _run(self, item: dict[str, Any], style: torch.Tensor, generator: torch.Generator) -> ADRun:
        s = self.settings
        height, width = self._latent_size()
        return sample(self.model, style, None, prompt=item.get("prompt") or "",
                      negative_prompt=s["negative_prompt"], num_images=s["num_images"], height=height, width=width,
                      guidance_scale=float(s["guidance_scale"]), adain_on=bool(s["adain"]), cfg=self.config(),
                      generator=generator, start_time=float(s.get("start_time", 999)),
                      init_from_style=bool(s.get("init_from_style", False)))


class ADTransfer(_ADOperator):
    """``ad-transfer``: content image + style image(s); optimisation from the content latent, or sampling."""

    name, kind, methods = "ad-transfer", "transfer", ("optimize", "sample")

    def _missing(self, item: dict[str, Any]) -> str | None:
        return None if item.get("content") is not None else f"{self.name}: no content image"

    def _run(self, item: dict[str, Any], style: torch.Tensor, generator: torch.Generator) -> ADRun:
        s = self.settings
        height, width = self._latent_size()
        content = self.model.encode_images(pil_to_tensor(item["content"], tuple(s["size"])))
        if s["method"] == "optimize":
            return optimize(self.model, style, content, num_images=s["num_images"], height=height, width=width,
                            cfg=self.config(), generator=generator)
        return sample(self.model, style, content, prompt=item.get("prompt") or "",
                      negative_prompt=s.get("negative_prompt", ""), num_images=s["num_images"], height=height,
                      width=width, guidance_scale=float(s["guidance_scale"]), adain_on=bool(s["adain"]),
                      cfg=self.config(), generator=generator, start_time=float(s.get("start_time", 999)))


class ADTexture(_ADOperator):
    """``ad-texture``: style image(s) only; optimisation, sampling, or MultiDiffusion panorama; optional tiling."""

    name, kind, methods = "ad-texture", "texture", ("optimize", "sample", "panorama")

    def __init__(self, model: str, params: dict[str, Any] | None = None, device: str = "cpu") -> None:
        super().__init__(model, params, device)
        tiling = self.settings.setdefault("tiling", "none")
        if tiling not in ("none", "xy", "x", "y"):
            raise ValueError(f"{self.name}: tiling must be none|xy|x|y, got {tiling!r}")
        if self.settings["method"] == "panorama":
            window = int(self.model.unet.config.sample_size)
            self.settings.setdefault("stride", max(window // 8, 1))

    def _run(self, item: dict[str, Any], style: torch.Tensor, generator: torch.Generator) -> ADRun:
        s = self.settings
        height, width = self._latent_size()
        if s["method"] == "optimize":
            return optimize(self.model, style, None, num_images=s["num_images"], height=height, width=width,
                            cfg=self.config(), generator=generator)
        if s["method"] == "sample":
            return sample(self.model, style, None, prompt="", negative_prompt="", num_images=s["num_images"],
                          height=height, width=width, guidance_scale=float(s["guidance_scale"]),
                          adain_on=bool(s["adain"]), cfg=self.config(), generator=generator,
                          start_time=float(s.get("start_time", 999)))
        return panorama(self.model, style, num_images=s["num_images"], height=height, width=width,
                        stride=int(s["stride"]), view_batch_size=int(s["view_batch_size"]),
                        adain_on=bool(s["adain"]), cfg=self.config(), generator=generator)
