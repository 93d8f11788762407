"""Loading an SD1.5/SDXL pipeline for AD, with the attention tap installed, and the UNet passes AD needs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from operators.attention import AttentionTap, LayerFeatures, install_tap
from operators.models import resolve_model

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
