"""Offline random-weight FLUX.1 models (Fill and text-to-image), for tests and CPU benchmarks.

It keeps what the Sissi code depends on: double- and single-stream blocks with joint attention, QK-RMSNorm,
RoPE, the guidance embedding, a VAE that downsamples by 8 with 2x2 latent packing (so 16 px = one token),
CLIP + T5 text encoders, and the Fill input layout (noisy latents + masked-image latents + packed mask).
Only the widths and depths shrink. The tokenizers are written here (byte-level BPE for CLIP, a character
Unigram for T5) so nothing is downloaded; different prompts still give different token ids.
"""

from __future__ import annotations

import logging
import string
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Named sizes. "small" keeps tests fast; "bench" makes the transformer (and its attention) the main cost.
SIZES: dict[str, dict[str, Any]] = {
    "small": {
        "num_layers": 1,
        "num_single_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "text_dim": 32,
        "latent_channels": 4,
        "vae_channels": 8,
    },
    "bench": {
        "num_layers": 2,
        "num_single_layers": 4,
        "num_attention_heads": 4,
        "attention_head_dim": 64,
        "text_dim": 64,
        "latent_channels": 4,
        "vae_channels": 8,
    },
}


def _rope_axes(head_dim: int) -> list[int]:
    """Split ``head_dim`` into the three RoPE axes (text index, row, column) like Flux's (16, 56, 56)."""
    if head_dim % 8:
        raise ValueError(f"attention_head_dim must be a multiple of 8, got {head_dim}")
    first = max(2, head_dim // 8 // 2 * 2)
    side = (head_dim - first) // 2
    side -= side % 2
    return [head_dim - 2 * side, side, side]


def _clip_tokenizer():
    """Byte-level BPE with the CLIP pre-tokenizer: every byte and byte+``</w>`` is a token, a few merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for pair in ("t h", "th e</w>", "a n", "i n", "o n</w>", "e r", "a r", "o f</w>"):
        left, right = pair.split()
        merged = left + right
        if merged not in vocab:
            vocab[merged] = len(vocab)
            merges.append((left, right))
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    return tok, len(vocab)


def _t5_tokenizer():
    """Character Unigram in T5's layout (<pad>=0, </s>=1, <unk>=2, then pieces)."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces.append((ch, -6.0))
        pieces.append(("\u2581" + ch, -5.0))
    for word in ("the", "a", "of", "in", "on", "and", "with", "style", "painting", "photo", "image"):
        pieces.append(("\u2581" + word, -3.0))
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = 512
    return tok, len(pieces)


def _build_tiny_flux(pipeline_cls, in_channels, seed: int, size: str, overrides: dict[str, Any]):
    """Shared builder of the tiny Fill and text-to-image pipelines; ``in_channels(latent_channels)`` gives the
    transformer's input width. Weights depend only on ``seed``, the size and that width."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if size not in SIZES:
        raise ValueError(f"unknown tiny flux size {size!r}; known: {', '.join(SIZES)}")
    cfg = {**SIZES[size], **overrides}
    unknown = set(cfg) - set(SIZES["small"])
    if unknown:
        raise ValueError(f"unknown tiny flux size keys: {sorted(unknown)}")
    text_dim = int(cfg["text_dim"])
    latent_ch = int(cfg["latent_channels"])
    vae_ch = int(cfg["vae_channels"])
    head_dim = int(cfg["attention_head_dim"])

    clip_tok, clip_vocab = _clip_tokenizer()
    t5_tok, t5_vocab = _t5_tokenizer()
    # Construction draws from the global RNG; fork it so building a model never disturbs the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(vae_ch,) * 4,
            layers_per_block=1,
            latent_channels=latent_ch,
            norm_num_groups=min(4, vae_ch),
            sample_size=64,
            scaling_factor=1.5035,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=clip_vocab,
                hidden_size=text_dim,
                intermediate_size=2 * text_dim,
                projection_dim=text_dim,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=t5_vocab,
                d_model=text_dim,
                d_kv=8,
                d_ff=2 * text_dim,
                num_layers=2,
                num_heads=4,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=in_channels(latent_ch),
            out_channels=4 * latent_ch,
            num_layers=int(cfg["num_layers"]),
            num_single_layers=int(cfg["num_single_layers"]),
            attention_head_dim=head_dim,
            num_attention_heads=int(cfg["num_attention_heads"]),
            joint_attention_dim=text_dim,
            pooled_projection_dim=text_dim,
            guidance_embeds=True,
            axes_dims_rope=tuple(_rope_axes(head_dim)),
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
        use_dynamic_shifting=True,
    )
    return pipeline_cls(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip.eval(),
        tokenizer=clip_tok,
        text_encoder_2=t5.eval(),
        tokenizer_2=t5_tok,
        transformer=transformer.eval(),
    )


def build_tiny_flux_fill(seed: int = 0, size: str = "small", **overrides: Any):
    """Return a random-weight ``FluxFillPipeline``; weights depend only on ``seed`` and the size."""
    from diffusers import FluxFillPipeline

    packed_mask = 4 * 8 * 8  # the pixel mask reshaped to 8x8 per latent, then 2x2-packed
    return _build_tiny_flux(FluxFillPipeline, lambda ch: 8 * ch + packed_mask, seed, size, overrides)


def build_tiny_flux(seed: int = 0, size: str = "small", **overrides: Any):
    """Return a random-weight text-to-image ``FluxPipeline`` (packed noisy latents only, 4 x latent channels)."""
    from diffusers import FluxPipeline

    return _build_tiny_flux(FluxPipeline, lambda ch: 4 * ch, seed, size, overrides)


def _save(pipe, out_dir: Path, kind: str, seed: int, size: dict[str, Any]) -> Path:
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    logger.info("wrote tiny %s (seed=%s, %s) to %s", kind, seed, size or "small", out)
    return out


def save_tiny_flux_fill(out_dir: Path, seed: int = 0, **size: Any) -> Path:
    """Write the tiny pipeline to ``out_dir`` (diffusers layout, safetensors). ``size``: see ``SIZES``."""
    return _save(build_tiny_flux_fill(seed=seed, **size), out_dir, "flux-fill", seed, size)


def save_tiny_flux(out_dir: Path, seed: int = 0, **size: Any) -> Path:
    """Write the tiny text-to-image ``FluxPipeline`` to ``out_dir`` (diffusers layout, safetensors)."""
    return _save(build_tiny_flux(seed=seed, **size), out_dir, "flux", seed, size)
