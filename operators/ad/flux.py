"""Attention Distillation (AD) text-to-image sampling on FLUX, following the authors' ``flux_ad`` code.

Why a separate module: the SD/SDXL implementation (``operators.ad.sd``) taps UNet self-attention; FLUX has
joint text+image attention in double- and single-stream blocks, a flow-matching Euler scheduler and packed
latents, so the loop and the tap differ. The algorithm and its quirks (AdaIN at every AD step, AD passes with
the null prompt at guidance 1.0, the null prompt always at 512 T5 tokens, the style latent being a posterior
*sample*, a fresh Adam per AD step) are those of xugao97/AttentionDistillation ``flux_ad/mypipeline.py``, so that
a seeded run reproduces its golden outputs (tests/data/fixtures/ad-reference-flux): bit for bit on the CPU that
made them, within the cross-CPU bounds of tests/golden.py elsewhere.

No Ray, nothing from ``pipeline/``. Every random draw comes from the ``torch.Generator`` passed in, in the
authors' order: initial noise, the style's VAE posterior sample, then one style noise per AD step except the last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from operators.ad.losses import concat_style_kv
from operators.ad.model import DTYPES
from operators.attention import flux_joint_qkv
from operators.models import TINY_PREFIX, looks_local, resolve_model


def load_flux_pipeline(model_dir: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``FluxPipeline`` with an eager-attention T5, the transformer and text encoders in ``dtype`` on ``device``.

    Why eager: under transformers >= 5 T5's SDPA path gives embeddings about 5e-6 away from the eager ones the
    reference used (fixture README). The VAE stays fp32 in every dtype: decoded pixels are the product, and its
    posterior sample is one of the reference's random draws.
    """
    from diffusers import AutoencoderKL, FluxPipeline
    from transformers import T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(
        f"{model_dir}/text_encoder_2", dtype=dtype, use_safetensors=True, attn_implementation="eager"
    )
    vae = AutoencoderKL.from_pretrained(f"{model_dir}/vae", dtype=torch.float32, use_safetensors=True)
    pipe = FluxPipeline.from_pretrained(model_dir, dtype=dtype, use_safetensors=True, text_encoder_2=t5, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    return pipe.to(device)


@dataclass
class FluxTap:
    """Counts the joint-attention calls of one forward and keeps Q, K, V, O of the chosen ones.

    Why execution order: the layer index of the reference counts calls as they run (double-stream blocks, then
    single-stream blocks), which is what :meth:`start` resets.
    """

    layers: tuple[int, ...]
    counter: int = 0
    q: list[torch.Tensor] = field(default_factory=list)
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    out: list[torch.Tensor] = field(default_factory=list)
    double: list[bool] = field(default_factory=list)

    def start(self) -> None:
        self.counter = 0
        self.q, self.k, self.v, self.out, self.double = [], [], [], [], []

    def record(self, q, k, v, o, double: bool) -> None:
        if self.counter in self.layers:
            self.q.append(q)
            self.k.append(k)
            self.v.append(v)
            self.out.append(o)
            self.double.append(double)
        self.counter += 1


class FluxTapProcessor:
    """The installed diffusers' ``FluxAttnProcessor`` math (native SDPA backend), plus a tap.

    Q/K/V are recorded exactly as fed to ``scaled_dot_product_attention``: ``(B, heads, L, head_dim)`` after
    QK-RMSNorm and RoPE, text tokens first; O is the SDPA output before the head merge.
    """

    def __init__(self, tap: FluxTap) -> None:
        self.tap = tap

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value = flux_joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        self.tap.record(q, k, v, out, encoder_hidden_states is not None)
        hidden_states = out.permute(0, 2, 1, 3).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [n_txt, hidden_states.shape[1] - n_txt], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def install_tap(transformer, layers) -> FluxTap:
    """Puts a :class:`FluxTapProcessor` on every joint attention (double blocks, then single blocks)."""
    tap = FluxTap(tuple(range(*layers)))
    processor = FluxTapProcessor(tap)
    for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
        block.attn.set_processor(processor)
    return tap


def adain(source: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """AdaIN on packed tokens (B, L, C): source stats over tokens, target stats over batch and tokens.

    Unbiased std and eps on the source std only, as the reference's ``utils.adain``.
    """
    s_mean, s_std = source.mean(dim=1, keepdim=True), source.std(dim=1, keepdim=True)
    t_mean, t_std = target.mean(dim=(0, 1), keepdim=True), target.std(dim=(0, 1), keepdim=True)
    return (source - s_mean) / (s_std + eps) * t_std + t_mean


def ad_loss_fast(tap: FluxTap, ref_k, ref_v):
    """:func:`ad_loss` without an autograd graph for the target and reduced in fp32 whatever the model dtype."""
    terms = []
    for q, o, rk, rv in zip(tap.q, tap.out, ref_k, ref_v, strict=True):
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q, rk.expand(q.shape[0], -1, -1, -1),
                                                 rv.expand(q.shape[0], -1, -1, -1))
        terms.append((o.float() - ref.float()).abs().mean())
    return sum(terms), terms


def ad_loss(tap: FluxTap, ref_k, ref_v):
    """Sum over layers (python ``sum``, from 0) of L1-mean(O, SDPA(Q, K_style, V_style).detach()).

    Why the ``contiguous`` for double-stream layers: the mean's summation order follows the memory layout. The
    reference (diffusers 0.32.2, heads split before the text/image concat) has contiguous (B, H, L, D) tensors
    there, while this processor's are (B, L, H, D) in memory; in single-stream layers both keep (B, L, H, D)
    strides. Matching the layout makes the loss values bit-identical; the gradient is the same either way.
    """
    terms = []
    for q, o, rk, rv, double in zip(tap.q, tap.out, ref_k, ref_v, tap.double, strict=True):
        ref = F.scaled_dot_product_attention(q, rk, rv).detach()
        if double:
            o, ref = o.contiguous(), ref.contiguous()
        terms.append(F.l1_loss(o, ref))
    return sum(terms), terms


def flux_ad_sample(
    pipe,
    style_image: torch.Tensor,
    prompt: str,
    *,
    height: int,
    width: int,
    steps: int,
    lr: float,
    iters: int,
    layers: tuple[int, int],
    guidance_scale: float,
    start_time: float = 9999,
    max_sequence_length: int = 512,
    generator: torch.Generator,
    prompt_2: str | None = None,
    gradient_checkpointing: bool = False,
    adain_on: bool = True,
    fast: bool = False,
):
    """AD-guided FLUX sampling. Returns ``(packed_latents, image, trace)``.

    ``style_image`` is (S, 3, Hs, Ws) float in [0, 1]. With S = 1 this is the reference, draw for draw. Beyond it,
    S > 1 style images (same size) are supported: their posterior samples and per-step noises are drawn as one
    (S, ...) tensor, each style gets its own null-prompt feature pass, and their K/V (null-text tokens included)
    are concatenated on the token axis, so each query attends jointly over all styles; AdaIN pools the styles'
    statistics. ``adain_on=False`` skips the AdaIN the reference applies at every AD step. One output image per
    call. ``gradient_checkpointing`` (the notebook's ``enable_gradient_checkpoint``) trades compute
    for memory in the AD backward passes and changes no bits. ``trace`` holds the step-by-step tensors, named as in
    the fixture files.

    Device and precision follow the pipeline (:func:`load_flux_pipeline`); the optimised latents, the scheduler and
    the AD losses stay fp32, every draw is made on the generator's device (the CPU) and moved. ``fast``: the
    styles' feature pass is one batched forward, the target attention is computed without autograd and the
    losses are reduced in fp32 (for a bf16 model); the random draws are the reference's, so in fp32 a fast run
    differs from the reference only by floating-point reassociation.
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    transformer, vae, scheduler = pipe.transformer, pipe.vae, pipe.scheduler
    device, dtype = transformer.device, torch.float32
    trace: dict[str, list | torch.Tensor] = {k: [] for k in ("euler_out", "style_noised", "ad_step_index",
                                                             "ad_init", "ad_out", "layer_losses", "losses")}
    batch = 1
    with torch.no_grad():
        null_embeds, null_pooled, null_text_ids = pipe.encode_prompt(prompt="", prompt_2=prompt_2, device=device)
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=batch,
            max_sequence_length=max_sequence_length,
        )
    channels = transformer.config.in_channels // 4
    # draw 1: the initial noise
    latents, image_ids = pipe.prepare_latents(batch, channels, height, width, dtype, device, generator)
    trace["init_latents"] = latents.clone()
    # draw 2: the style's posterior sample (the reference uses sample_mode="sample")
    with torch.no_grad():
        posterior = vae.encode(style_image.to(device, vae.dtype) * 2.0 - 1.0).latent_dist
        style_latent = posterior.sample(generator)
    style_latent = (style_latent.to(dtype) - vae.config.shift_factor) * vae.config.scaling_factor
    trace["style_latent"] = style_latent.clone()
    styles, _, style_h, style_w = style_latent.shape
    style_latent = pipe._pack_latents(style_latent, styles, channels, style_h, style_w)
    _, style_ids = pipe.prepare_latents(batch, channels, style_image.shape[2], style_image.shape[3], dtype, device,
                                        generator, style_latent)
    trace.update(null_embeds=null_embeds, null_pooled_embeds=null_pooled, prompt_embeds=prompt_embeds,
                 pooled_prompt_embeds=pooled, latent_image_ids=image_ids, style_image_ids=style_ids)

    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(latents.shape[1], scheduler.config.base_image_seq_len, scheduler.config.max_image_seq_len,
                         scheduler.config.base_shift, scheduler.config.max_shift)
    retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    timesteps = scheduler.timesteps
    trace["timesteps"], trace["sigmas"] = timesteps.clone(), scheduler.sigmas.clone()

    saved_processors, saved_checkpointing = transformer.attn_processors, transformer.gradient_checkpointing
    tap = install_tap(transformer, layers)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    try:
        latents = _denoise(pipe, tap, latents, style_latent, timesteps, start_time, steps, lr, iters, guidance_scale,
                           generator, (prompt_embeds, pooled, text_ids, image_ids),
                           (null_embeds, null_pooled, null_text_ids, style_ids), trace, adain_on, fast)
    finally:
        transformer.set_attn_processor(saved_processors)
        if gradient_checkpointing and not saved_checkpointing:
            transformer.disable_gradient_checkpointing()
    for name in ("euler_out", "style_noised", "ad_init", "ad_out", "layer_losses", "losses"):
        trace[name] = torch.stack(trace[name]) if trace[name] else None
    trace["ad_step_index"] = torch.tensor(trace["ad_step_index"])
    with torch.no_grad():
        unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        unpacked = unpacked / vae.config.scaling_factor + vae.config.shift_factor
        image = (vae.decode(unpacked.to(vae.dtype), return_dict=False)[0].float() * 0.5 + 0.5).clamp(0, 1)
    return latents, image, trace


def _denoise(pipe, tap, latents, style_latent, timesteps, start_time, steps, lr, iters, guidance_scale, generator,
             cond, null, trace, adain_on=True, fast=False):
    """The reference's loop: Euler step, then (if t < start_time) style pass, AdaIN and a fresh Adam."""
    transformer, scheduler = pipe.transformer, pipe.scheduler
    model_dtype = transformer.dtype
    device, dtype, batch = latents.device, latents.dtype, latents.shape[0]
    prompt_embeds, pooled, text_ids, image_ids = cond
    null_embeds, null_pooled, null_text_ids, style_ids = null
    guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(batch)
    null_guidance = torch.full([1], 1, device=device, dtype=torch.float32)

    def forward(hidden, t, guid, pooled_, embeds, txt_ids, img_ids):
        tap.start()
        return transformer(hidden_states=hidden.to(model_dtype), timestep=t, guidance=guid,
                           pooled_projections=pooled_, encoder_hidden_states=embeds, txt_ids=txt_ids,
                           img_ids=img_ids, joint_attention_kwargs=None, return_dict=False)[0].to(dtype)

    first = True
    for i, t in enumerate(timesteps):
        with torch.no_grad():
            v = forward(latents, t.expand(batch).to(dtype) / 1000, guidance, pooled, prompt_embeds, text_ids,
                        image_ids)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
        trace["euler_out"].append(latents.detach().clone())
        if not t < start_time:
            continue
        if i < steps - 1:
            t_next = timesteps[i + 1:i + 2]
            # draw 3: one style noise per AD step except the last
            noise = torch.randn(style_latent.shape, generator=generator, dtype=style_latent.dtype,
                                device=generator.device).to(device)
            style_ = scheduler.scale_noise(style_latent, t_next, noise)
            trace["style_noised"].append(style_.clone())
        else:
            t_next = torch.tensor([0], device=device)
            style_ = style_latent
        ref_k, ref_v = _style_kv(forward, style_, t_next, null_guidance, null, tap, fast)
        if adain_on:
            latents = adain(latents, style_)
        latents = latents.detach().requires_grad_()
        trace["ad_step_index"].append(i)
        trace["ad_init"].append(latents.detach().clone())
        optimizer = torch.optim.Adam([latents], lr=lr)
        step_losses, step_layer_losses = [], []
        for _ in range(iters):
            optimizer.zero_grad()
            forward(latents, t_next / 1000, null_guidance, null_pooled, null_embeds, null_text_ids, image_ids)
            loss, terms = (ad_loss_fast if fast else ad_loss)(tap, ref_k, ref_v)
            loss.backward()
            if first:
                trace.update(x0=latents.detach().clone(), loss0=loss.detach().reshape(1).clone(),
                             grad0=latents.grad.detach().clone())
                first = False
            step_losses.append(loss.detach())
            step_layer_losses.append(torch.stack([x.detach() for x in terms]))
            optimizer.step()
        trace["ad_out"].append(latents.detach().clone())
        trace["losses"].append(torch.stack(step_losses))
        trace["layer_losses"].append(torch.stack(step_layer_losses))
        tap.start()
    return latents.detach()


def _style_kv(forward, style_, t_next, null_guidance, null, tap, fast):
    """The AD layers' K/V of the null-prompt pass over the style latents, joined over the styles on the token
    axis: one pass per style as the reference (so that one style is bit-identical), or one batched pass."""
    null_embeds, null_pooled, null_text_ids, style_ids = null
    styles = style_.shape[0]
    with torch.no_grad():
        if fast:
            forward(style_, t_next / 1000, null_guidance.expand(styles), null_pooled.expand(styles, -1),
                    null_embeds.expand(styles, -1, -1), null_text_ids, style_ids)
            # (S, h, L, d) per layer -> (1, h, S*L, d), style-major as the reference's per-style concatenation
            joined = [concat_style_kv(k, v) for k, v in zip(tap.k, tap.v, strict=True)]
            return [k for k, _ in joined], [v for _, v in joined]
        ks, vs = [], []
        for one in style_.split(1):
            forward(one, t_next / 1000, null_guidance, null_pooled, null_embeds, null_text_ids, style_ids)
            ks.append(tap.k)
            vs.append(tap.v)
    if styles == 1:
        return ks[0], vs[0]
    return ([torch.cat(layer, dim=2) for layer in zip(*ks, strict=True)],
            [torch.cat(layer, dim=2) for layer in zip(*vs, strict=True)])


def flux_kind(spec: str | None, *, offline: bool = False) -> bool | None:
    """Whether ``spec`` is a text-to-image FLUX pipeline (model_index.json ``_class_name`` FluxPipeline).

    ``offline``: decide without building or downloading anything (config time): ``tiny:<kind>`` and local
    directories are answered, a hub id gives None (unknown)."""
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


_FLUX_CACHE: dict[tuple[str, str, str], Any] = {}


def load_flux_model(spec: str, precision: str = "fp32", device: str = "cpu"):
    """Load (once per process, device and precision) a FLUX pipeline through :func:`load_flux_pipeline`."""
    key = (spec, precision, device)
    if key not in _FLUX_CACHE:
        _FLUX_CACHE[key] = load_flux_pipeline(resolve_model(spec), DTYPES[precision], device)
    return _FLUX_CACHE[key]
