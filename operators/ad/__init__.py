"""Attention Distillation (Zhou et al., CVPR 2025, arXiv 2502.20235) on SD1.5 / SDXL UNets and FLUX.

The AD loss compares a latent's self-attention output ``Attn(Q, K, V)`` with the "ideal" stylised output
``Attn(Q, K_s, V_s)`` (style keys/values, detached) at a few layers; the latent itself is optimised with Adam.
One module per concern, each readable in one sitting (shared capture machinery: ``operators/attention.py``):

- :mod:`~operators.ad.losses`: the AD, content and fast losses, attention masks, AdaIN;
- :mod:`~operators.ad.model`: loading an SD/SDXL pipeline with the attention tap, the UNet passes;
- :mod:`~operators.ad.sd`: optimisation (transfer, texture) and AD-guided DDIM sampling, reference and fast;
- :mod:`~operators.ad.textures`: MultiDiffusion panorama textures and seamless tiling;
- :mod:`~operators.ad.flux`: AD-guided FLUX sampling (the authors' ``flux_ad``);
- :mod:`~operators.ad.params`, :mod:`~operators.ad.operator`: the params tables and the registry operators.

Deviations from the authors' code, and the params: docs/ad.md.
"""

from operators.ad.flux import flux_ad_sample, flux_kind, load_flux_model, load_flux_pipeline
from operators.ad.images import pil_to_tensor, tensor_to_pil
from operators.ad.losses import ad_loss, ad_loss_fast, adain, concat_style_kv, content_loss
from operators.ad.model import DTYPES, ADModel, Cond, is_sdxl, load_ad_model
from operators.ad.operator import ADText2Image, ADTexture, ADTransfer
from operators.ad.sd import ADConfig, ADRun, optimize, sample
from operators.ad.textures import circular_padding, panorama, panorama_views

__all__ = [
    "DTYPES", "ADConfig", "ADModel", "ADRun", "ADText2Image", "ADTexture", "ADTransfer", "Cond", "ad_loss",
    "ad_loss_fast", "adain", "circular_padding", "concat_style_kv", "content_loss", "flux_ad_sample", "flux_kind",
    "is_sdxl", "load_ad_model", "load_flux_model", "load_flux_pipeline", "optimize", "panorama", "panorama_views",
    "pil_to_tensor", "sample", "tensor_to_pil",
]
