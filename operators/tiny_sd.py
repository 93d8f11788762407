"""Tiny random-weight Stable Diffusion 1.5 / SDXL pipelines for offline tests.

They keep the real block layouts (16 and 70 self-attention layers, same index -> resolution map, so the AD
layer choices (10,16) and (64,70) mean the same thing) with tiny channel widths, and a hand-written CLIP
vocabulary so no tokenizer is downloaded. Weights are deterministic from ``seed``.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _write_tokenizer_files(folder: Path) -> tuple[Path, Path, int]:
    """A character-level CLIP BPE vocabulary: specials, a-z and a-z</w>, no merges."""
    vocab = {BOS: 0, EOS: 1}
    for ch in string.ascii_lowercase:
        vocab[ch] = len(vocab)
        vocab[f"{ch}</w>"] = len(vocab)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, indent=1))
    merges_file.write_text("#version: 0.2\n")
    return vocab_file, merges_file, len(vocab)


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    vocab_file, merges_file, _ = _write_tokenizer_files(folder)
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token=EOS)


def _text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )


def _vae(sample_px: int, scaling_factor: float):
    from diffusers import AutoencoderKL

    # Four blocks give vae_scale_factor 8, as in the real models.
    return AutoencoderKL(
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=sample_px, scaling_factor=scaling_factor, force_upcast=False,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )


def save_tiny_sd15(out_dir: Path, seed: int = 0, sample_size: int = 8) -> Path:
    """SD1.5 layout (4 down/up blocks, 16 self-attentions), ``sample_size`` latents (x8 pixels)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(seed)
        tokenizer = _tokenizer(Path(tmp))
        unet = UNet2DConditionModel(
            sample_size=sample_size, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
            cross_attention_dim=32, attention_head_dim=2,
        )
        vae = _vae(sample_size * 8, 0.18215)
        text_encoder = CLIPTextModel(_text_config(64))
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def save_tiny_sdxl(out_dir: Path, seed: int = 0, sample_size: int = 16) -> Path:
    """SDXL layout (3 blocks, transformer depths 1/2/10, 70 self-attentions), two text encoders."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(seed)
        tokenizer = _tokenizer(Path(tmp))
        unet = UNet2DConditionModel(
            sample_size=sample_size, block_out_channels=(32, 64, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 4), cross_attention_dim=64,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32,
        )
        vae = _vae(sample_size * 8, 0.13025)
        text_encoder = CLIPTextModel(_text_config(64))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(64))
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
        )
        pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
