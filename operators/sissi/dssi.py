"""DSSI attention on plain tensors: stock softmax attention for every query but the target's, DSSI for those.

DSSI is computed from three per-branch attentions (text, style, self) over the target queries, each done by
a fused kernel that also returns its log-sum-exp (:mod:`~operators.sissi.kernels`); the branch masses of the
joint softmax follow from the log-sum-exps, so no score matrix is materialised when a fused kernel exists, and
the FLOPs equal stock attention (the other queries run plain SDPA against all keys). Lambda comes from
:mod:`~operators.sissi.modes`, the recombination from ``compose``.

Why a module of its own: this is the method itself (docs/research/sissi.md §4), free of diffusers, so that it
can be tested against a float64 reference (tests/test_sissi.py); the Flux processor
(:mod:`~operators.sissi.processor`) calls :func:`dssi_attention_at` with the :class:`Positions` it caches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from operators.sissi.kernels import attention_with_lse
from operators.sissi.modes import lambda_for
from operators.sissi.params import COMPOSES, MODES


@dataclass(frozen=True)
class Positions:
    """Sequence positions of one layout for one (device, sequence length)."""

    text_len: int
    out_pos: torch.Tensor  # target queries
    rest_pos: torch.Tensor  # every other query (text, style, anything else)
    style_pos: torch.Tensor  # style keys
    self_pos: torch.Tensor  # image keys outside the style set (the target region in a diptych)


def token_positions(n_tokens: int, text_len: int, style_index: torch.Tensor, output_index: torch.Tensor, device):
    n_img = n_tokens - text_len
    style_index = torch.as_tensor(style_index, dtype=torch.long).flatten().to("cpu")
    output_index = torch.as_tensor(output_index, dtype=torch.long).flatten().to("cpu")
    if n_img < 0 or (style_index.numel() and not 0 <= int(style_index.min()) <= int(style_index.max()) < n_img):
        raise ValueError(f"style_index outside the {n_img} image tokens")
    if output_index.numel() and not 0 <= int(output_index.min()) <= int(output_index.max()) < n_img:
        raise ValueError(f"output_index outside the {n_img} image tokens")
    is_out = torch.zeros(n_tokens, dtype=torch.bool)
    is_out[output_index + text_len] = True
    is_style = torch.zeros(n_img, dtype=torch.bool)
    is_style[style_index] = True
    return Positions(
        text_len=text_len,
        out_pos=(output_index + text_len).to(device),
        rest_pos=(~is_out).nonzero().flatten().to(device),
        style_pos=(is_style.nonzero().flatten() + text_len).to(device),
        self_pos=((~is_style).nonzero().flatten() + text_len).to(device),
    )



def _prompt_lens(prompt_len, batch: int, text_len: int) -> list[int] | None:
    """Per-item text key counts for the DSSI rows' text branch, or None for all ``text_len`` keys."""
    if prompt_len is None:
        return None
    lens = [prompt_len] * batch if isinstance(prompt_len, int) else [int(n) for n in prompt_len]
    if len(lens) != batch:
        raise ValueError(f"prompt_len has {len(lens)} entries for a batch of {batch}")
    lens = [min(max(n, 0), text_len) for n in lens]
    return None if all(n == text_len for n in lens) else lens


def _text_branch(q_o, k, v, text_len: int, lens: list[int] | None, scale: float):
    """Text-branch attention and LSE of the target queries; with ``lens``, item b sees only its first lens[b] keys."""
    if lens is None:
        return attention_with_lse(q_o, k[:, :, :text_len], v[:, :, :text_len], scale)
    groups: dict[int, list[int]] = {}
    for b, n in enumerate(lens):
        groups.setdefault(n, []).append(b)
    if len(groups) == 1:
        n = lens[0]
        return attention_with_lse(q_o, k[:, :, :n], v[:, :, :n], scale)
    out = lse = None
    for n, items in groups.items():
        idx = torch.tensor(items, device=q_o.device)
        o_g, l_g = attention_with_lse(q_o[idx], k[idx, :, :n], v[idx, :, :n], scale)
        if out is None:
            out = o_g.new_empty(q_o.shape[:-1] + v.shape[-1:])
            lse = l_g.new_empty(q_o.shape[:-1])
        out.index_copy_(0, idx, o_g.to(out.dtype))
        lse.index_copy_(0, idx, l_g.to(lse.dtype))
    return out, lse


def _dssi_rows(
    q, k, v, pos: Positions, mode: str, lam: float, compose: str, stats: list | None, prompt_len=None
):
    """DSSI output for the target queries, ``(B,H,No,D)`` in the compute dtype (>= fp32)."""
    scale = q.shape[-1] ** -0.5
    q_o = q.index_select(2, pos.out_pos)
    lens = _prompt_lens(prompt_len, q.shape[0], pos.text_len)
    s, lse_t = _text_branch(q_o, k, v, pos.text_len, lens, scale)
    t, lse_s = attention_with_lse(q_o, k.index_select(2, pos.style_pos), v.index_select(2, pos.style_pos), scale)
    o, lse_o = attention_with_lse(q_o, k.index_select(2, pos.self_pos), v.index_select(2, pos.self_pos), scale)
    ctype = lse_t.dtype
    lse_t, lse_s, lse_o = (x.unsqueeze(-1) for x in (lse_t, lse_s, lse_o))
    s, t, o = (x.to(ctype) for x in (s, t, o))
    lse_all = torch.logsumexp(torch.cat([lse_t, lse_s, lse_o], dim=-1), dim=-1, keepdim=True)
    a_t, a_s, a_o = (torch.exp(x - lse_all) for x in (lse_t, lse_s, lse_o))  # joint-softmax branch masses
    n_t = pos.text_len if lens is None else torch.tensor(lens, dtype=ctype, device=q.device).view(-1, 1, 1, 1)
    lam_t = lambda_for(mode, lam, a_t, a_s, lse_t, lse_s, n_t, pos.style_pos.numel())
    if compose == "mass_preserving":
        rows = torch.lerp(s, t, lam_t).mul_(a_t + a_s).addcmul_(a_o, o)
    elif compose == "replace":
        rows = torch.lerp(s, t, lam_t)
    elif compose == "self_inclusive":  # softmax([S_t,S_o]) [V_t;V_o] rebuilt from the branch LSEs
        s2 = torch.lerp(o, s, torch.sigmoid(lse_t - lse_o))
        t2 = torch.lerp(o, t, torch.sigmoid(lse_s - lse_o))
        rows = torch.lerp(s2, t2, lam_t)
    else:
        raise ValueError(f"unknown DSSI compose {compose!r}; known: {', '.join(COMPOSES)}")
    if stats is not None:  # per item: mean branch masses, then lambda mean, min and max over heads and queries
        lam_full = lam_t.expand_as(a_t).flatten(1)
        cols = [x.mean(dim=(1, 2, 3)) for x in (a_t, a_s, a_o)]
        cols += [lam_full.mean(dim=1), lam_full.amin(dim=1), lam_full.amax(dim=1)]
        stats.append(torch.stack(cols, dim=1).cpu())
    return rows


def dssi_attention_at(
    q, k, v, pos: Positions, mode, lam, compose, stats=None, prompt_len=None, rest_attention=None
) -> torch.Tensor:
    """Plain attention for the non-target queries, DSSI for the target ones, written into one output.

    ``rest_attention(q, k, v)`` (``(B,H,N,D)`` in and out) replaces SDPA for the non-target rows, so that a chosen
    attention backend also serves them.
    """
    out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
    if pos.rest_pos.numel():
        rest_fn = rest_attention or F.scaled_dot_product_attention
        rest = rest_fn(q.index_select(2, pos.rest_pos), k, v)
        out.index_copy_(2, pos.rest_pos, rest.to(q.dtype))
        del rest
    if pos.out_pos.numel():
        rows = _dssi_rows(q, k, v, pos, mode, lam, compose, stats, prompt_len)
        out.index_copy_(2, pos.out_pos, rows.to(q.dtype))
    return out


def dssi_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    text_len: int,
    style_index: torch.Tensor | Sequence[int],
    output_index: torch.Tensor | Sequence[int],
    mode: str = "dynamic",
    lam: float = 0.5,
    compose: str = "mass_preserving",
    prompt_len: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Joint attention with DSSI on the target queries (docs/architecture.md §6).

    Tensors are ``(batch, heads, tokens, head_dim)``, tokens ordered ``[text, image]``; ``style_index`` and
    ``output_index`` are positions within the image tokens. Queries outside ``output_index`` get plain softmax
    attention. For target queries the text branch (keys ``[0, text_len)``), the style branch (``style_index``)
    and the self branch (all other image tokens) are attended separately and recombined per ``mode`` and
    ``compose``; ``vanilla`` + ``mass_preserving`` is exactly plain attention. ``prompt_len`` (an int or one per
    batch item) limits the target queries' text branch to the first ``prompt_len`` text keys (padding left out);
    the other queries keep all keys.
    """
    if mode not in MODES or mode == "off":
        raise ValueError(f"unknown DSSI mode {mode!r}; known: {', '.join(MODES[1:])}")
    if compose not in COMPOSES:
        raise ValueError(f"unknown DSSI compose {compose!r}; known: {', '.join(COMPOSES)}")
    if query.dim() != 4 or key.shape[:2] != query.shape[:2] or key.shape[2] != value.shape[2]:
        raise ValueError("query/key/value must be (batch, heads, tokens, head_dim) with matching keys and values")
    pos = token_positions(key.shape[2], int(text_len), style_index, output_index, query.device)
    return dssi_attention_at(query, key, value, pos, mode, lam, compose, prompt_len=prompt_len)



def diptych_layout(panel_tokens_w: int, panel_tokens_h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-token positions of the style (left) and target (right) panels in a raster-ordered diptych."""
    cols = torch.arange(2 * panel_tokens_w).repeat(panel_tokens_h)
    index = torch.arange(cols.numel())
    return index[cols < panel_tokens_w], index[cols >= panel_tokens_w]

