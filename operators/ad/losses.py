"""The AD and content losses on captured attention features (docs/research/ad.md §1.3, §2): the authors' form, the
fast form, AdaIN.

Why its own module: both the SD/SDXL drivers and the operator's mask handling use these, and they are what the
golden fixtures check term by term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from operators.attention import LayerFeatures


def ad_loss(
    q_list: Sequence[torch.Tensor],
    ks_list: Sequence[torch.Tensor],
    vs_list: Sequence[torch.Tensor],
    out_list: Sequence[torch.Tensor],
    scale: float = 1.0,
    attn_masks: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """AD loss as the authors compute it: per layer mean L1(out, Attn(q, Ks, Vs).detach()), summed over layers.

    ``q``/``out``: ``(B, h, N, d)`` of the optimised latent; ``ks``/``vs``: ``(S, h, Ns, d)``, the S style images
    concatenated on the key axis so every query attends jointly over all style tokens. ``attn_masks``: per layer
    None or a boolean ``(N, S*Ns)`` mask of the style keys each query may attend (mask-controlled synthesis,
    :mod:`operators.ad.masks`).
    """
    loss: torch.Tensor | float = 0.0
    masks = attn_masks if attn_masks is not None else [None] * len(q_list)
    for q, ks, vs, out, mask in zip(q_list, ks_list, vs_list, out_list, masks, strict=True):
        styles, batch = ks.shape[0], q.shape[0]
        k_style = torch.cat(ks.chunk(styles, dim=0), dim=2).repeat(batch, 1, 1, 1)
        v_style = torch.cat(vs.chunk(styles, dim=0), dim=2).repeat(batch, 1, 1, 1)
        target = F.scaled_dot_product_attention(q * scale, k_style, v_style, attn_mask=mask)
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
    feats: Sequence[LayerFeatures],
    style_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
    scale: float = 1.0,
    attn_masks: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Same value as :func:`ad_loss` with pre-joined style K/V: no copies, no graph for the target, fp32 L1."""
    loss: torch.Tensor | float = 0.0
    masks = attn_masks if attn_masks is not None else [None] * len(feats)
    for feat, (k_style, v_style), mask in zip(feats, style_kv, masks, strict=True):
        batch = feat.q.shape[0]
        with torch.no_grad():
            target = F.scaled_dot_product_attention(
                feat.q * scale,
                k_style.expand(batch, -1, -1, -1).to(feat.q.dtype),
                v_style.expand(batch, -1, -1, -1).to(feat.q.dtype),
                attn_mask=mask,
            )
        loss = loss + (feat.out.float() - target.float()).abs().mean()
    return loss  # type: ignore[return-value]


def adain(source: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Match per-channel mean/std of ``source`` (per sample) to those of ``target`` (pooled over its batch)."""
    s_mean, s_std = source.mean(dim=(2, 3), keepdim=True), source.std(dim=(2, 3), keepdim=True)
    t_mean, t_std = target.mean(dim=(0, 2, 3), keepdim=True), target.std(dim=(0, 2, 3), keepdim=True)
    return (source - s_mean) / (s_std + eps) * t_std + t_mean
