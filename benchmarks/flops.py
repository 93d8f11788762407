"""FLOP counts and throughput projection behind benchmarks/PROJECTION.md (no weights, no GPU, no network).

The real architectures are instantiated from their published configs on the ``meta`` device (shapes only, no
memory) and run under ``torch.utils.flop_counter.FlopCounterMode``, which counts matmuls, convolutions and
attention (2 FLOPs per multiply-add; elementwise ops, norms and softmax are not counted). On ``meta`` SDPA
decomposes into two ``bmm`` per call, so attention is counted exactly.

    .venv/bin/python benchmarks/flops.py            # tables as markdown
    .venv/bin/python benchmarks/flops.py --json     # the same numbers as one JSON object
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

META = torch.device("meta")
T = 1e12

# ------------------------------------------------------------------------------------------------------------
# published configs


FLUX_FILL = dict(  # black-forest-labs/FLUX.1-Fill-dev transformer/config.json
    patch_size=1, in_channels=384, out_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
VAE_COMMON = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
FLUX_VAE = dict(VAE_COMMON, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
SDXL_VAE = dict(VAE_COMMON, latent_channels=4)
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
T5_XXL = dict(  # google/t5-v1_1-xxl (FLUX text_encoder_2), encoder only
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77)
CLIP_G_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, projection_dim=1280)

# From open_clip docs/model_profile.csv via docs/research/ecosystem.md §5 (image towers at 224 px).
CLIP_IMAGE_GFLOPS = {"ViT-L-14": 162.03, "ViT-B-32": 8.82}

# ------------------------------------------------------------------------------------------------------------
# counting


def flops(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def params(model: torch.nn.Module) -> float:
    return float(sum(p.numel() for p in model.parameters()))


def meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device=META)


def flux_counts(panel: int = 512, text_tokens: int = 512) -> dict[str, float]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with META:
        tr = FluxTransformer2DModel(**FLUX_FILL)
        vae = AutoencoderKL(**FLUX_VAE)
        t5 = T5EncoderModel(T5Config(**T5_XXL))
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
    n_img = (2 * panel // 16) * (panel // 16)  # 1024x512 canvas -> 64x32 latent tokens after 8x VAE and 2x2 patchify

    def step() -> None:
        tr(hidden_states=meta(1, n_img, 384), encoder_hidden_states=meta(1, text_tokens, 4096),
           pooled_projections=meta(1, 768), timestep=meta(1), guidance=meta(1),
           img_ids=torch.zeros(n_img, 3, device=META), txt_ids=torch.zeros(text_tokens, 3, device=META),
           return_dict=False)

    def attention_only() -> float:  # the bmm share: attention scores and weighted sum
        with FlopCounterMode(display=False) as counter:
            step()
        return float(sum(v for op, v in counter.get_flop_counts()["Global"].items() if "bmm" in str(op)))

    with torch.no_grad():
        out = {
            "transformer_params": params(tr),
            "t5_params": params(t5),
            "image_tokens": float(n_img),
            "step": flops(step),
            "step_attention": attention_only(),
            "vae_encode": flops(lambda: vae.encode(meta(1, 3, panel, 2 * panel))),
            "vae_decode": flops(lambda: vae.decode(meta(1, 16, panel // 8, 2 * panel // 8))),
            "t5": flops(lambda: t5(input_ids=torch.zeros(1, text_tokens, dtype=torch.long, device=META))),
            "clip_text": flops(lambda: clip(input_ids=torch.zeros(1, 77, dtype=torch.long, device=META))),
        }
    # FLUX.1-dev (in_channels 64) at a plain 512x512 image, for the published-throughput sanity check
    with META:
        dev = FluxTransformer2DModel(**dict(FLUX_FILL, in_channels=64))
    for px in (512, 1024):  # FLUX.1-dev, plain square image, 512 text tokens
        n = (px // 16) ** 2
        with torch.no_grad():
            out[f"dev_{px}_step"] = flops(lambda n=n: dev(
                hidden_states=meta(1, n, 64), encoder_hidden_states=meta(1, 512, 4096),
                pooled_projections=meta(1, 768), timestep=meta(1), guidance=meta(1),
                img_ids=torch.zeros(n, 3, device=META), txt_ids=torch.zeros(512, 3, device=META), return_dict=False))
    return out


class _Stop(Exception):  # noqa: N818 - control flow, as operators.attention.StopForward
    pass


def sdxl_counts(size: int = 1024, ad_layers: tuple[int, int] = (64, 70)) -> dict[str, float]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with META:
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT))
    unet.requires_grad_(False)
    lat = size // 8
    # self-attention layers in execution order (down, mid, up), as the AD tap numbers them
    order = [b for b in unet.down_blocks] + [unet.mid_block] + [b for b in unet.up_blocks]
    self_attn = [m for blk in order for n, m in blk.named_modules() if n.endswith("attn1")]
    assert len(self_attn) == 70, len(self_attn)
    ad = self_attn[ad_layers[0]:ad_layers[1]]
    outs: list[torch.Tensor] = []
    for m in ad:
        m.register_forward_hook(lambda _m, _a, o: outs.append(o))
    last = ad[-1]
    stop = {"on": False}

    def _maybe_stop(_m, _a, _o):
        if stop["on"]:
            raise _Stop

    last.register_forward_hook(_maybe_stop)

    def forward(batch: int, x: torch.Tensor | None = None, early: bool = False) -> None:
        outs.clear()
        stop["on"] = early
        x = meta(batch, 4, lat, lat) if x is None else x
        cond = {"text_embeds": meta(batch, 1280), "time_ids": meta(batch, 6)}
        try:
            unet(x, meta(batch), encoder_hidden_states=meta(batch, 77, 2048), added_cond_kwargs=cond)
        except _Stop:
            pass

    def fwd_bwd(checkpointing: bool) -> tuple[float, float]:
        if checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        x = meta(1, 4, lat, lat).requires_grad_(True)
        with torch.enable_grad():
            f = flops(lambda: forward(1, x, early=True))
            loss = sum(o.float().abs().mean() for o in outs)
            b = flops(lambda: loss.backward())
        unet.disable_gradient_checkpointing()
        return f, b

    with torch.no_grad():
        out = {
            "unet_params": params(unet) + 0.0,
            "unet_fwd_b1": flops(lambda: forward(1)),
            "unet_fwd_b2": flops(lambda: forward(2)),
            "unet_fwd_to_last_ad_layer": flops(lambda: forward(1, early=True)),
            "vae_decode": flops(lambda: vae.decode(meta(1, 4, lat, lat))),
            "text_encoders": flops(lambda: (te1(input_ids=torch.zeros(1, 77, dtype=torch.long, device=META)),
                                            te2(input_ids=torch.zeros(1, 77, dtype=torch.long, device=META)))),
        }
    f, b = fwd_bwd(checkpointing=False)
    out["opt_fwd"], out["opt_bwd"] = f, b
    f, b = fwd_bwd(checkpointing=True)
    out["opt_bwd_checkpointed"] = b
    # AD loss target: Attn(Q, K_s, V_s) per AD layer, no grad (4 FLOPs per query-key-channel)
    tgt = 0.0
    for m in ad:
        tokens = (lat // 2) ** 2  # up_blocks[1] runs at latent/2: 64x64 = 4096 tokens at 1024 px
        tgt += 4.0 * tokens * tokens * m.to_q.out_features
    out["ad_target_attention"] = tgt
    return out


# ------------------------------------------------------------------------------------------------------------
# projection

PEAK_BF16 = 989e12  # H100 SXM dense bf16 tensor peak
PEAK_TF32 = 494.5e12  # H100 SXM dense TF32 tensor peak (cuDNN convolutions in fp32 use TF32 by default)
MFU = {  # (low, mid, high) model FLOPs utilisation per component class
    "flux": (0.30, 0.40, 0.50),
    "unet": (0.20, 0.275, 0.35),
    "vae": (0.15, 0.225, 0.30),
}
DSSI = (1.10, 1.05, 1.03)  # time factor of DSSI on, (low, mid, high) throughput cases
R_PIPE = 0.90
CLUSTER_GPUS, STYLIZE_GPUS = 64, 63  # one GPU holds the quarter-GPU CLIP scorers


def sissi_time(c: dict[str, float], steps: int, case: int) -> float:
    pf = PEAK_BF16 * MFU["flux"][case]
    pv = PEAK_BF16 * MFU["vae"][case]
    return (steps * c["step"] * DSSI[case] + c["t5"] + c["clip_text"]) / pf + (c["vae_encode"] + c["vae_decode"]) / pv


def ad_components(c: dict[str, float], steps: int = 50, iters: int = 2, checkpointing: bool = True) -> dict[str, float]:
    bwd = c["opt_bwd_checkpointed"] if checkpointing else c["opt_bwd"]
    return {
        "denoise (CFG, batch 2)": steps * c["unet_fwd_b2"],
        "style features (to layer 69)": steps * c["unet_fwd_to_last_ad_layer"],
        "AD iters: forward": steps * iters * c["opt_fwd"],
        "AD iters: backward" + (" + recompute" if checkpointing else ""): steps * iters * bwd,
        "AD loss target attention": steps * iters * c["ad_target_attention"],
        "text encoders (3 prompts)": 3 * c["text_encoders"],
    }


def ad_time(c: dict[str, float], case: int, checkpointing: bool = True) -> float:
    unet = sum(ad_components(c, checkpointing=checkpointing).values())
    return unet / (PEAK_BF16 * MFU["unet"][case]) + c["vae_decode"] / (PEAK_TF32 * MFU["vae"][case])


def per_hour(seconds: float) -> float:
    return 3600.0 / seconds


def report(flux: dict[str, float], sdxl: dict[str, float]) -> str:
    lines = ["## FLOPs per image (TFLOP)", ""]
    lines.append(f"Flux-Fill transformer params {flux['transformer_params'] / 1e9:.2f} B, T5-XXL encoder "
                 f"{flux['t5_params'] / 1e9:.2f} B, SDXL UNet {sdxl['unet_params'] / 1e9:.2f} B")
    lines.append(f"Flux-Fill step ({int(flux['image_tokens'])}+512 tokens): {flux['step'] / T:.2f} "
                 f"(attention bmm {flux['step_attention'] / T:.2f}); FLUX.1-dev step 512px "
                 f"{flux['dev_512_step'] / T:.2f}, 1024px {flux['dev_1024_step'] / T:.2f}")
    for k in ("vae_encode", "vae_decode", "t5", "clip_text"):
        lines.append(f"flux {k}: {flux[k] / T:.3f}")
    for k, v in sdxl.items():
        if k != "unet_params":
            lines.append(f"sdxl {k}: {v / T:.3f}")
    for steps in (50, 28):
        total = steps * flux["step"] + flux["t5"] + flux["clip_text"] + flux["vae_encode"] + flux["vae_decode"]
        lines.append(f"sissi {steps} steps total: {total / T:.0f}")
    for ckpt in (True, False):
        comps = ad_components(sdxl, checkpointing=ckpt)
        for k, v in comps.items():
            lines.append(f"ad-t2i {k}: {v / T:.1f}")
        lines.append(f"ad-t2i total (checkpointing={ckpt}, with VAE decode): "
                     f"{(sum(comps.values()) + sdxl['vae_decode']) / T:.0f}")
    s = sdxl
    ref_step = s["unet_fwd_b2"] + s["unet_fwd_b1"] + 2 * (s["unet_fwd_b1"] + s["opt_bwd"])
    for ckpt, bwd in ((True, s["opt_bwd_checkpointed"]), (False, s["opt_bwd"])):
        fast_step = s["unet_fwd_b2"] + s["unet_fwd_to_last_ad_layer"] + 2 * (s["opt_fwd"] + bwd)
        lines.append(f"ad-t2i FLOPs per step, fast (checkpointing={ckpt}) / reference (full forwards, no "
                     f"checkpointing): {fast_step / ref_step:.3f}; per AD iteration (fwd+bwd)/fwd "
                     f"{(s['opt_fwd'] + bwd) / s['opt_fwd']:.2f}")
    lines += ["", "## Projection (low / mid / high)", ""]
    for name, fn in (("sissi 50", lambda i: sissi_time(flux, 50, i)), ("sissi 28", lambda i: sissi_time(flux, 28, i)),
                     ("ad-t2i sdxl", lambda i: ad_time(sdxl, i)),
                     ("ad-t2i sdxl, no checkpointing", lambda i: ad_time(sdxl, i, checkpointing=False))):
        secs = [fn(i) for i in range(3)]
        gpu = [per_hour(s) for s in secs]
        cluster = [g * R_PIPE * STYLIZE_GPUS for g in gpu]
        lines.append(f"{name}: s/img {' / '.join(f'{s:.2f}' for s in secs)}; img/h/GPU "
                     f"{' / '.join(f'{g:.0f}' for g in gpu)}; 64 GPUs img/h {' / '.join(f'{c:,.0f}' for c in cluster)}")
    sissi_gflops = 50 * flux["step"] / 1e9
    clip = CLIP_IMAGE_GFLOPS["ViT-L-14"] + flux["clip_text"] / 1e9
    lines.append(f"CLIP ViT-L-14 score per image {clip:.0f} GFLOP = {clip / sissi_gflops:.2e} of a 50-step Sissi image")
    return "\n".join(lines)


def main() -> int:
    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    flux, sdxl = flux_counts(), sdxl_counts()
    if args.json:
        print(json.dumps({"flux_fill": flux, "sdxl": sdxl}, indent=1))
    else:
        print(report(flux, sdxl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
