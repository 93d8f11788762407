"""The SD/SDXL drivers: optimisation from clean latents (transfer, texture) and AD-guided DDIM sampling.

Two modes (docs/ad.md; fixtures in tests/data/fixtures/ad-reference):
- reference (``fast=False``, fp32): the authors' order of random draws, batch shapes and operations, so that with
  one CPU thread the fixtures are reproduced;
- fast (``fast=True``, bf16 autocast by default on CUDA): style features for many timesteps in one batched
  forward, forwards stop after the last AD layer, target attention under ``no_grad``, ``expand`` instead of
  ``repeat``, gradient checkpointing for SDXL. It keeps the method: the same random draws, and the content query
  from a forward shaped like the latents' own (the exact q = q_c tie at the first iteration); in fp32 it differs
  from reference mode only by floating-point reassociation. Deviations from the authors' code: docs/ad.md.

Every random draw comes from the item's ``torch.Generator`` (CPU), in the reference order: the initial latent,
then per AD step AdaIN noise, style noise, content noise.

The per-step pieces (``Request``, ``TargetFeatures``, ``draw_step_noise``, ``ad_timestep``, ``ad_refine``,
``randn``, ``finish``) are shared with the panorama driver, :mod:`~operators.ad.textures`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from operators.ad.losses import ad_loss, ad_loss_fast, adain, concat_style_kv, content_loss
from operators.ad.masks import LabelMasks
from operators.ad.model import ADModel, Cond
from operators.attention import LayerFeatures


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
class Request:
    """Inputs of one AD step's target features: style latents (S) and optional content latent (1) at ``t``."""

    t: torch.Tensor
    style: torch.Tensor
    content: torch.Tensor | None


@dataclass
class Targets:
    """One AD step's targets: the style K/V per layer and, with a content image, its query per layer."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # reference: raw (S,h,N,d); fast: joined (1,h,S*N,d)
    qc: list[torch.Tensor] | None


class TargetFeatures:
    """Style K/V (and content Q) for a sequence of AD steps, consumed in order.

    Reference mode runs the authors' separate style and content forwards per step; fast mode runs
    ``feature_chunk`` steps' style latents as one batch with per-sample timesteps. The content query comes, in
    both modes, from a forward shaped exactly like the optimised latents' own (``rows`` copies, same code path),
    so that at the first iteration, where the latent *is* the content latent, q equals q_c bit for bit: the
    content loss and its L1 subgradient are exactly 0, as in the authors' code (a batched forward would leave
    rounding noise whose signs Adam's first step follows).
    """

    def __init__(self, model: ADModel, cfg: ADConfig, null: Cond, requests: Sequence[Request],
                 rows: int = 1) -> None:
        self.model, self.cfg, self.null, self.requests, self.rows = model, cfg, null, list(requests), rows
        self._cache: dict[int, Targets] = {}

    def __getitem__(self, i: int) -> Targets:
        if i not in self._cache:
            self._cache.clear()
            end = min(i + (self.cfg.feature_chunk if self.cfg.fast else 1), len(self.requests))
            with torch.no_grad():
                if self.cfg.fast:
                    self._cache.update(self._batched(i, end))
                else:
                    self._cache[i] = self._single(self.requests[i])
        return self._cache[i]

    def _single(self, req: Request) -> Targets:
        layers = self.cfg.layer_ids
        style = self.model.features(req.style, req.t, self.null.batch(req.style.shape[0]), layers)
        qc = None
        if req.content is not None:
            qc = [f.q for f in self.model.features(req.content, req.t, self.null.batch(1), layers)]
        return Targets([(f.k, f.v) for f in style], qc)

    def _content_q(self, req: Request) -> list[torch.Tensor]:
        content = req.content.expand(self.rows, *req.content.shape[1:])
        feats = self.model.features(content, req.t, self.null.batch(self.rows), self.cfg.layer_ids, stop_early=True)
        return [f.q[:1] for f in feats]

    def _batched(self, start: int, end: int) -> dict[int, Targets]:
        reqs = self.requests[start:end]
        rows = [r.style for r in reqs]
        per = [x.shape[0] for x in rows]
        t = torch.cat([r.t.reshape(1).expand(n) for r, n in zip(reqs, per, strict=True)]).to(self.model.device)
        feats = self.model.features(torch.cat(rows), t, self.null.batch(sum(per)), self.cfg.layer_ids,
                                    stop_early=True)
        out, offset = {}, 0
        for i, (req, n) in enumerate(zip(reqs, per, strict=True)):
            kv = [concat_style_kv(f.k[offset:offset + n], f.v[offset:offset + n]) for f in feats]
            out[start + i] = Targets(kv, self._content_q(req) if req.content is not None else None)
            offset += n
        return out


def _descend(
    model: ADModel,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, Any],
    targets: Targets,
    cfg: ADConfig,
    optimizer: torch.optim.Optimizer,
    run: ADRun,
    masks: Callable[[Sequence[LayerFeatures], Targets], list[torch.Tensor]] | None = None,
) -> None:
    """``cfg.iters`` Adam steps on ``x`` against one step's targets (``masks``: per-layer attention masks)."""
    for _ in range(cfg.iters):
        optimizer.zero_grad()
        feats = model.features(x, t, cond, cfg.layer_ids, stop_early=cfg.fast)
        attn_masks = masks(feats, targets) if masks is not None else None
        if cfg.fast:
            style = ad_loss_fast(feats, targets.kv, cfg.attn_scale, attn_masks)
        else:
            style = ad_loss([f.q for f in feats], [k for k, _ in targets.kv], [v for _, v in targets.kv],
                            [f.out for f in feats], scale=cfg.attn_scale, attn_masks=attn_masks)
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


def finish(run: ADRun) -> ADRun:
    """The run with its losses as Python floats (read back once, at the end, not per Adam step)."""
    run.losses = [float(v) for v in run.losses]
    run.ad_losses = [float(v) for v in run.ad_losses]
    return run


def randn(generator: torch.Generator, shape: Sequence[int], device: torch.device) -> torch.Tensor:
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
    label_masks: LabelMasks | None = None,
) -> ADRun:
    """Optimisation-based transfer/texture: Adam on clean latents over a decreasing timestep schedule.

    ``style``: ``(S,4,h,w)`` latents; ``content``: ``(1,4,h,w)`` or None; ``height``/``width`` in latent pixels.
    One randn for the initial latent is always drawn, even when the content latent replaces it.
    ``label_masks``: mask-controlled synthesis (:mod:`operators.ad.masks`).
    """
    channels = model.unet.config.in_channels
    latents = randn(generator, (num_images, channels, height, width), model.device)
    null = model.null_cond(height * model.vae_scale, width * model.vae_scale)
    if content is not None:
        latents = torch.cat([content.clone()] * num_images)
    scheduler = model.scheduler()
    scheduler.set_timesteps(cfg.steps)
    timesteps = list(scheduler.timesteps)
    targets = TargetFeatures(model, cfg, null, [Request(t, style, content) for t in timesteps], rows=num_images)
    latents = latents.detach().float().requires_grad_()
    optimizer = torch.optim.Adam([latents], lr=cfg.lr)
    cond = null.batch(num_images)
    run = ADRun(latents)
    masks = None
    if label_masks is not None:
        styles, style_hw = style.shape[0], tuple(style.shape[-2:])

        def masks(feats: Sequence[LayerFeatures], step: Targets) -> list[torch.Tensor]:
            per_style = 1 if not cfg.fast else styles  # fast mode's K/V are joined over the styles
            return [label_masks.layer_mask((height, width), style_hw, f.q.shape[2], k.shape[2] // per_style,
                                           styles, f.q.device) for f, (k, _) in zip(feats, step.kv, strict=True)]
    for i, t in enumerate(timesteps):
        _descend(model, latents, t, cond, targets[i], cfg, optimizer, run, masks)
    run.latents = latents.detach()
    return finish(run)


def ad_timestep(t: torch.Tensor, scheduler) -> torch.Tensor:
    """Level of x_{t-1}: ``max(t - T // N, 0)`` as the authors compute it (a tensor either way)."""
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    zero = torch.tensor([0], device=t.device)
    return max(prev, zero)


@dataclass
class StepNoise:
    """The noise one AD step draws: for the AdaIN target (when on), the style latents, the content latent."""

    adain: torch.Tensor | None
    style: torch.Tensor
    content: torch.Tensor | None


def draw_step_noise(
    generator: torch.Generator, style: torch.Tensor, content: torch.Tensor | None, adain_on: bool, device
) -> StepNoise:
    # Order matters for reproducing the reference: AdaIN noise, style noise, content noise.
    a = randn(generator, style.shape, device) if adain_on else None
    s = randn(generator, style.shape, device)
    c = randn(generator, content.shape, device) if content is not None else None
    return StepNoise(a, s, c)


def ad_refine(
    model: ADModel,
    x: torch.Tensor,
    t_ad: torch.Tensor,
    targets: Targets,
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
    latents = randn(generator, (num_images, channels, height, width), model.device) * scheduler.init_noise_sigma
    if init_from_style:
        if tuple(style.shape[-2:]) != (height, width):
            raise ValueError(f"init_from_style needs the output size of the style latents ({style.shape[-1]}x"
                             f"{style.shape[-2]} latent px), got {width}x{height}")
        init = style[torch.arange(num_images) % style.shape[0]]
        latents = scheduler.add_noise(init, randn(generator, init.shape, model.device), torch.tensor([999]))
    scheduler.set_timesteps(cfg.steps)
    timesteps = list(scheduler.timesteps)
    null = model.null_cond(px_h, px_w)
    active = [i for i, t in enumerate(timesteps) if cfg.iters > 0 and t < start_time]  # steps followed by AD
    t_ads = {i: ad_timestep(timesteps[i], scheduler) for i in active}
    noises = {i: draw_step_noise(generator, style, content, adain_on, model.device) for i in active}
    requests = [
        Request(t_ads[i], scheduler.add_noise(style, noises[i].style, t_ads[i]),
                scheduler.add_noise(content, noises[i].content, t_ads[i]) if content is not None else None)
        for i in active
    ]
    targets = TargetFeatures(model, cfg, null, requests)
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
            latents = ad_refine(model, latents, t_ads[i], targets[position[i]], adain_target, null, cfg, run)
    run.latents = latents
    return finish(run)
