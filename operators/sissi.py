"""Sissi: training-free style-guided synthesis as in-context inpainting on FLUX.1-Fill, with DSSI.

The style image is the left panel of a diptych, the right panel is fully masked and FluxFill paints it from
the prompt; DSSI (Dynamic Semantic-Style Integration) re-weights, for the target-panel queries only, the
attention between the text branch and the style-image branch (docs/research/sissi.md §3-4).

Everything that is a reading of the paper rather than the paper itself is a switch: ``dssi.mode`` (how
gamma, hence lambda, is obtained), ``dssi.compose`` (what happens to the target's own keys),
``dssi.layers`` and ``dssi.steps`` (where DSSI applies).

DSSI is computed from three per-branch attentions (text, style, self) over the target queries, each done by
a fused kernel that also returns its log-sum-exp; the branch masses of the joint softmax follow from the
log-sum-exps, so no score matrix is materialised when a fused kernel exists, and the FLOPs equal stock
attention (the other queries run plain SDPA against all keys).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "black-forest-labs/FLUX.1-Fill-dev"
MODES = ("off", "vanilla", "printed", "fixed", "dynamic", "lse_ratio", "dynamic_norm")
TEXT_TOKENS = ("all", "prompt")
CACHES = ("off", "first_block")
COMPOSES = ("mass_preserving", "replace", "self_inclusive")
PROMPT_TEMPLATES = {
    "plain": "{prompt}",
    "diptych": (
        "A diptych with two side-by-side images in the same artistic style. On the left is a reference "
        "artwork; on the right, {prompt}, in the same style."
    ),
}
_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# Branch attention with log-sum-exp
# --------------------------------------------------------------------------------------------------

_warned_fallback: set[str] = set()


def _math_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Reference path: one branch's score matrix at a time, in at least fp32."""
    ctype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(ctype), k.to(ctype).transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.to(ctype))
    return out.to(q.dtype), lse


def _cpu_flash_lse(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]
    return out, lse


def _cuda_flash_lse(q, k, v, scale):
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return res[0], res[1]


def _cuda_efficient_lse(q, k, v, scale):
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
    return res[0], res[1][..., : q.shape[-2]]  # the kernel pads the LSE's query axis


def _pick_kernel(q: torch.Tensor):
    if q.device.type == "cpu":
        return _cpu_flash_lse
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0:
            return _cuda_flash_lse
        return _cuda_efficient_lse
    return _math_attention_lse


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its per-query log-sum-exp (in fp32 or wider): ``(B,H,Nq,D), (B,H,Nq)``.

    Uses the fused kernel torch has for the device (flash on CPU/CUDA, mem-efficient for fp32 CUDA) and falls
    back to the math path when the kernel refuses the input. An empty key set gives zeros and ``-inf``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if k.shape[-2] == 0:
        lse_dtype = torch.promote_types(q.dtype, torch.float32)
        return q.new_zeros(q.shape[:-1] + v.shape[-1:]), q.new_full(q.shape[:-1], -math.inf, dtype=lse_dtype)
    kernel = _pick_kernel(q)
    if torch.compiler.is_compiling():
        return kernel(q, k, v, scale)
    try:
        out, lse = kernel(q, k, v, scale)
        if lse.shape != q.shape[:-1]:
            raise RuntimeError(f"unexpected LSE shape {tuple(lse.shape)}")
        return out, lse
    except (RuntimeError, NotImplementedError) as err:
        name = f"{kernel.__name__}:{q.device.type}:{q.dtype}"
        if name not in _warned_fallback:
            _warned_fallback.add(name)
            logger.warning("fused attention %s unavailable (%s); using the math path", name, err)
        return _math_attention_lse(q, k, v, scale)


# --------------------------------------------------------------------------------------------------
# DSSI objective, lambda and the attention itself
# --------------------------------------------------------------------------------------------------


def dssi_lambda(gamma: torch.Tensor | float) -> torch.Tensor | float:
    """Minimiser of ``||h-s||^2 + gamma ||h-t||^2`` over ``h = (1-lam) s + lam t``: ``gamma / (1+gamma)``."""
    return gamma / (1 + gamma)


def dssi_objective(lam: float | torch.Tensor, s: torch.Tensor, t: torch.Tensor, gamma: float | torch.Tensor):
    """The DSSI objective L(lam) (docs/research/sissi.md §4.2), summed over everything but leading batch dims."""
    h = (1 - lam) * s + lam * t
    return ((h - s) ** 2).sum() + gamma * ((h - t) ** 2).sum()


@dataclass(frozen=True)
class _Positions:
    """Sequence positions of one layout for one (device, sequence length)."""

    text_len: int
    out_pos: torch.Tensor  # target queries
    rest_pos: torch.Tensor  # every other query (text, style, anything else)
    style_pos: torch.Tensor  # style keys
    self_pos: torch.Tensor  # image keys outside the style set (the target region in a diptych)


def _positions(n_tokens: int, text_len: int, style_index: torch.Tensor, output_index: torch.Tensor, device):
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
    return _Positions(
        text_len=text_len,
        out_pos=(output_index + text_len).to(device),
        rest_pos=(~is_out).nonzero().flatten().to(device),
        style_pos=(is_style.nonzero().flatten() + text_len).to(device),
        self_pos=((~is_style).nonzero().flatten() + text_len).to(device),
    )


def _lambda_for(mode: str, lam: float, a_t, a_s, lse_t, lse_s, n_t=None, n_s=None) -> torch.Tensor:
    """Lambda per (B,H,No,1) or broadcastable; see docs/research/sissi.md §4.3 for each reading.

    ``dynamic_norm`` (the default) is the count-free reading of the paper's gamma. Per target query i the branch
    mass per key is ``rho_b,i = alpha_b,i / N_b``; the joint normaliser cancels in ``rho_s,i / rho_t,i``, leaving
    ``d_i = (LSE_s,i - log N_s) - (LSE_t,i - log N_t)``, the gap between the two branches' log-mean-exp scores,
    i.e. Proposition 1's difference of mean activations ``mu_s - mu_t``. Pooled by mean over the target queries
    (one scalar per batch and head, as the printed sum over "all elements" suggests), ``gamma = exp(mean_i d_i)``
    (the geometric mean of ``rho_s / rho_t``) and ``lambda = gamma / (1 + gamma) = sigmoid(mean_i d_i)``.
    Why this and not the alternatives: a difference of logs is the only comparison of the two branch levels that
    is invariant to adding a constant to a query's scores (softmax is), so no clamp or sign guard is needed,
    unlike a ratio of logs (``dynamic``, ``lse_ratio``); subtracting ``log N_b`` makes it exactly invariant to
    duplicating the text, style or target tokens, which pooling the joint masses by sum (``dynamic``) or even by
    arithmetic mean is not (each query's joint normaliser moves differently); and lambda is 0.5 when both
    branches are equally active per key and moves monotonically with one branch's activations. It equals
    ``vanilla``'s per-query split ``sigmoid(LSE_s - LSE_t)`` with the token-count prior ``log(N_s / N_t)`` removed.
    """
    if mode == "vanilla":  # the joint-softmax split: reproduces plain attention under mass_preserving
        return a_s / (a_t + a_s).clamp_min(torch.finfo(a_s.dtype).tiny)
    if mode == "printed":  # as printed: log(sum A_s)/log(sum A_t) of row-normalised A is 1, so lambda = 1/2
        return torch.full_like(a_s[..., :1, :], 0.5)
    if mode == "fixed":  # FSSI-style ablation
        return torch.full_like(a_s[..., :1, :], float(lam))
    if mode == "dynamic":  # joint-mass log ratio, one scalar per (batch, head), pooled over target queries
        m_t = a_t.sum(dim=-2, keepdim=True)
        m_s = a_s.sum(dim=-2, keepdim=True)
        gamma = torch.log1p(m_s) / torch.log1p(m_t).clamp_min(_EPS)
        return dssi_lambda(gamma).clamp(0, 1)
    if mode == "lse_ratio":  # per target query log-partition ratio (gamma clamped at 0 so lambda is in [0,1])
        gamma = lse_s.clamp_min(0) / (lse_t.abs() + _EPS)
        return dssi_lambda(gamma).clamp(0, 1)
    if mode == "dynamic_norm":  # per-key branch mass log ratio, mean over target queries (docstring above)
        log_n = [torch.as_tensor(n, dtype=lse_t.dtype, device=lse_t.device).clamp_min(1).log() for n in (n_t, n_s)]
        gap = (lse_s - log_n[1]) - (lse_t - log_n[0])  # +inf when there is no text key: lambda 1
        return torch.sigmoid(gap.mean(dim=-2, keepdim=True))
    raise ValueError(f"unknown DSSI mode {mode!r}; known: {', '.join(MODES[1:])}")


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
    q, k, v, pos: _Positions, mode: str, lam: float, compose: str, stats: list | None, prompt_len=None
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
    lam_t = _lambda_for(mode, lam, a_t, a_s, lse_t, lse_s, n_t, pos.style_pos.numel())
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


def _dssi_attention_at(
    q, k, v, pos: _Positions, mode, lam, compose, stats=None, prompt_len=None, rest_attention=None
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
    pos = _positions(key.shape[2], int(text_len), style_index, output_index, query.device)
    return _dssi_attention_at(query, key, value, pos, mode, lam, compose, prompt_len=prompt_len)


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


@dataclass
class DSSIConfig:
    """Where and how DSSI applies (docs/research/sissi.md §4, §9)."""

    mode: str = "dynamic_norm"  # count-invariant reading; unverified on real weights (README)
    compose: str = "mass_preserving"
    lam: float = 0.5
    layers: str | list[int] = "all"  # all | double | single | global indices (double-stream blocks first)
    steps: tuple[float, float] = (0.0, 1.0)  # step i is gated in when start <= i/steps < end
    record: bool = False  # put branch masses and lambda per item into meta (costs a sync per layer)
    text_tokens: str = "all"  # all | prompt: leave T5 padding out of the DSSI rows' text branch


@dataclass
class SissiParams:
    panel_size: tuple[int, int] = (512, 512)  # (width, height) of each panel
    steps: int = 50
    guidance: float = 30.0
    max_sequence_length: int = 512
    prompt_template: str = "plain"
    dtype: str | None = None  # default: bfloat16 on CUDA, float32 elsewhere
    offload: bool = False  # enable_model_cpu_offload (accelerators only)
    vae_tiling: bool = False
    compile: bool = False  # regional torch.compile of the repeated transformer blocks
    cache: str = "off"  # off | first_block: diffusers' First Block Cache on the transformer (approximate)
    cache_threshold: float = 0.05  # FirstBlockCacheConfig.threshold
    attention_backend: str | None = None  # a diffusers attention backend for the stock rows and layers
    dssi: DSSIConfig = field(default_factory=DSSIConfig)


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be a boolean, got {value!r}")


def _parse_layers(value: Any) -> str | list[int]:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("all", "double", "single"):
            return text
        value = [part for part in text.replace(",", " ").split() if part]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        layers = [int(x) for x in value]
    except (TypeError, ValueError):
        raise ValueError(f"dssi.layers must be all|double|single or a list of layer indices, got {value!r}") from None
    if not layers:
        raise ValueError("dssi.layers is empty; use dssi.mode: off to disable DSSI")
    return layers


def _parse_steps(value: Any) -> tuple[float, float]:
    if isinstance(value, str):
        value = value.replace(":", ",").replace("-", ",").split(",")
    try:
        lo, hi = (float(x) for x in value)
    except (TypeError, ValueError):
        raise ValueError(f"dssi.steps must be a [start, end] fraction range, got {value!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"dssi.steps must satisfy 0 <= start < end <= 1, got {value!r}")
    return lo, hi


def _parse_panel(value: Any) -> tuple[int, int]:
    if isinstance(value, int | str) and not isinstance(value, bool):
        width = height = int(value)
    else:
        width, height = (int(x) for x in value)
    if width <= 0 or height <= 0:
        raise ValueError(f"panel_size must be positive, got {value!r}")
    return width, height


def _check_backend(name: str) -> None:
    """A diffusers ``AttentionBackendName`` value (imported only when a backend is asked for)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = sorted(b.value for b in AttentionBackendName)
    if name not in known:
        raise ValueError(f"attention_backend must be one of {', '.join(known)}, got {name!r}")


def parse_params(params: dict[str, Any] | None) -> SissiParams:
    """Validate operator params; nested ``{"dssi": {...}}`` and dotted ``"dssi.mode"`` keys are equivalent."""
    flat = _flatten(dict(params or {}))
    out = SissiParams()
    d = out.dssi
    setters = {
        "panel_size": lambda v: setattr(out, "panel_size", _parse_panel(v)),
        "steps": lambda v: setattr(out, "steps", int(v)),
        "guidance": lambda v: setattr(out, "guidance", float(v)),
        "max_sequence_length": lambda v: setattr(out, "max_sequence_length", int(v)),
        "prompt_template": lambda v: setattr(out, "prompt_template", str(v)),
        "dtype": lambda v: setattr(out, "dtype", None if v is None else str(v)),
        "offload": lambda v: setattr(out, "offload", _as_bool(v, "offload")),
        "vae_tiling": lambda v: setattr(out, "vae_tiling", _as_bool(v, "vae_tiling")),
        "compile": lambda v: setattr(out, "compile", _as_bool(v, "compile")),
        "cache": lambda v: setattr(out, "cache", "off" if v in (None, False) else str(v).lower()),
        "cache_threshold": lambda v: setattr(out, "cache_threshold", float(v)),
        "attention_backend": lambda v: setattr(out, "attention_backend", None if v is None else str(v).lower()),
        "dssi.mode": lambda v: setattr(d, "mode", str(v).lower()),
        "dssi.compose": lambda v: setattr(d, "compose", str(v).lower()),
        "dssi.lam": lambda v: setattr(d, "lam", float(v)),
        "dssi.layers": lambda v: setattr(d, "layers", _parse_layers(v)),
        "dssi.steps": lambda v: setattr(d, "steps", _parse_steps(v)),
        "dssi.record": lambda v: setattr(d, "record", _as_bool(v, "dssi.record")),
        "dssi.text_tokens": lambda v: setattr(d, "text_tokens", str(v).lower()),
    }
    unknown = sorted(set(flat) - set(setters))
    if unknown:
        raise ValueError(f"unknown sissi params: {', '.join(unknown)}; known: {', '.join(sorted(setters))}")
    for key, value in flat.items():
        try:
            setters[key](value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"invalid sissi param {key}={value!r}: {err}") from None
    if d.mode not in MODES:
        raise ValueError(f"dssi.mode must be one of {', '.join(MODES)}, got {d.mode!r}")
    if d.compose not in COMPOSES:
        raise ValueError(f"dssi.compose must be one of {', '.join(COMPOSES)}, got {d.compose!r}")
    if d.text_tokens not in TEXT_TOKENS:
        raise ValueError(f"dssi.text_tokens must be one of {', '.join(TEXT_TOKENS)}, got {d.text_tokens!r}")
    if out.cache not in CACHES:
        raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {out.cache!r}")
    if not out.cache_threshold > 0:
        raise ValueError(f"cache_threshold must be > 0, got {out.cache_threshold}")
    if out.attention_backend is not None:
        _check_backend(out.attention_backend)
    if not 0.0 <= d.lam <= 1.0:
        raise ValueError(f"dssi.lam must be in [0, 1], got {d.lam}")
    if out.steps < 1 or out.max_sequence_length < 1:
        raise ValueError("steps and max_sequence_length must be >= 1")
    template = PROMPT_TEMPLATES.get(out.prompt_template, out.prompt_template)
    if "{prompt}" not in template:
        raise ValueError("prompt_template must be plain, diptych or a string containing {prompt}")
    if out.dtype is not None and out.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {out.dtype!r}")
    return out


# --------------------------------------------------------------------------------------------------
# Layout and the Flux attention processor
# --------------------------------------------------------------------------------------------------


def diptych_layout(panel_tokens_w: int, panel_tokens_h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-token positions of the style (left) and target (right) panels in a raster-ordered diptych."""
    cols = torch.arange(2 * panel_tokens_w).repeat(panel_tokens_h)
    index = torch.arange(cols.numel())
    return index[cols < panel_tokens_w], index[cols >= panel_tokens_w]


class DSSIState:
    """Shared by the processors of one transformer: layout, the step gate and optional statistics."""

    def __init__(self, config: DSSIConfig, style_index: torch.Tensor, output_index: torch.Tensor, n_img: int):
        self.config = config
        self.style_index = style_index
        self.output_index = output_index
        self.n_img = n_img
        self.active = True
        self.step = 0
        self.stats: list[tuple[int, int, torch.Tensor]] | None = [] if config.record else None
        self.prompt_len: list[int] | None = None  # per batch item, set before each call under text_tokens: prompt
        self.n_double = 0  # global layers below this are double-stream (for the per-group records)
        self._cache: dict[tuple[str, int], _Positions] = {}

    def positions(self, device: torch.device, n_tokens: int) -> _Positions:
        key = (str(device), n_tokens)
        if key not in self._cache:
            text_len = n_tokens - self.n_img
            self._cache[key] = _positions(n_tokens, text_len, self.style_index, self.output_index, device)
        return self._cache[key]

    def set_step(self, step: int, num_steps: int) -> None:
        lo, hi = self.config.steps
        self.step = step
        self.active = lo <= step / num_steps < hi


@functools.cache
def _processor_class() -> type:
    """Built on first use so that importing this module does not import diffusers."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from operators.attention import flux_joint_qkv

    class SissiFluxAttnProcessor(FluxAttnProcessor):
        """Stock Flux attention (same projections, QK-norm, RoPE, output); DSSI while ``state.active``."""

        def __init__(self, state: DSSIState, layer: int):
            super().__init__()
            self.state = state
            self.layer = layer

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            query, key, value = flux_joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)

            st = self.state
            if st.active and attention_mask is None:
                cfg = st.config
                pos = st.positions(query.device, query.shape[1])
                stats = [] if st.stats is not None else None
                out = _dssi_attention_at(
                    query.transpose(1, 2),
                    key.transpose(1, 2),
                    value.transpose(1, 2),
                    pos,
                    cfg.mode,
                    cfg.lam,
                    cfg.compose,
                    stats,
                    prompt_len=st.prompt_len if cfg.text_tokens == "prompt" else None,
                    rest_attention=None if self._attention_backend is None else self._rest_attention,
                ).transpose(1, 2)
                if stats:
                    st.stats.append((self.layer, st.step, stats[0]))
            else:
                out = dispatch_attention_fn(
                    query,
                    key,
                    value,
                    attn_mask=attention_mask,
                    backend=self._attention_backend,
                    parallel_config=self._parallel_config,
                )
            hidden = out.flatten(2, 3).to(query.dtype)
            if encoder_hidden_states is None:
                return hidden
            enc, img = hidden.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            img = attn.to_out[1](attn.to_out[0](img.contiguous()))
            return img, attn.to_add_out(enc.contiguous())

        def _rest_attention(self, q, k, v):
            """The stock rows of a DSSI layer through the chosen backend (``(B,H,N,D)`` in and out)."""
            out = dispatch_attention_fn(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
            return out.transpose(1, 2)

    return SissiFluxAttnProcessor


def make_dssi_processor(state: DSSIState, layer: int):
    """A ``FluxAttnProcessor`` for global layer ``layer`` whose joint attention is DSSI while active."""
    return _processor_class()(state, layer)


def select_layers(spec: str | list[int], n_double: int, n_single: int) -> list[int]:
    """Global layer indices (double-stream first, then single-stream) that ``spec`` selects."""
    total = n_double + n_single
    if spec == "all":
        return list(range(total))
    if spec == "double":
        return list(range(n_double))
    if spec == "single":
        return list(range(n_double, total))
    chosen = set()
    for index in spec:
        if not -total <= index < total:
            raise ValueError(f"dssi.layers index {index} out of range for {total} layers")
        chosen.add(index % total)
    return sorted(chosen)


def install_dssi(transformer, config: DSSIConfig, style_index, output_index, n_img: int) -> DSSIState | None:
    """Put DSSI processors on the selected attention layers; ``mode: off`` leaves the model untouched."""
    if config.mode == "off":
        return None
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    state = DSSIState(config, style_index, output_index, n_img)
    state.n_double = len(transformer.transformer_blocks)
    for index in select_layers(
        config.layers, len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
    ):
        blocks[index].attn.set_processor(make_dssi_processor(state, index))
    return state


# --------------------------------------------------------------------------------------------------
# The operator
# --------------------------------------------------------------------------------------------------


def _set_backend(transformer, name: str) -> None:
    """Give every attention processor of ``transformer`` the backend, without changing diffusers' process-wide
    active backend (``set_attention_backend`` also sets that, which would reach every other model in the worker)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    previous = _AttentionBackendRegistry._active_backend
    try:
        transformer.set_attention_backend(name)
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)


def _to_rgb(image) -> Any:
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ValueError(f"style must be a PIL image, got {type(image).__name__}")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class SissiOperator:
    """Stylize a batch: diptych [style | masked target] through FluxFill + DSSI; returns the target panel."""

    name = "sissi"

    @staticmethod
    def check_params(params: dict[str, Any] | None) -> None:
        parse_params(params)

    def __init__(self, model: str | None = None, params: dict[str, Any] | None = None, device: str = "cpu"):
        from diffusers import FluxFillPipeline

        from operators.models import resolve_model

        self.params = parse_params(params)
        self.model_spec = model or DEFAULT_MODEL
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # match tensors' "cuda:N" for caches
            self.device = torch.device("cuda", torch.cuda.current_device())
        dtype_name = self.params.dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        self.dtype = getattr(torch, dtype_name)

        pipe = FluxFillPipeline.from_pretrained(resolve_model(self.model_spec), use_safetensors=True, dtype=self.dtype)
        pipe.set_progress_bar_config(disable=True)
        token_px = pipe.vae_scale_factor * 2
        width, height = self.params.panel_size
        if width % token_px or height % token_px:
            raise ValueError(f"panel_size {width}x{height} must be a multiple of {token_px} px")
        self.panel_tokens = (width // token_px, height // token_px)
        style_index, output_index = diptych_layout(*self.panel_tokens)
        self.state = install_dssi(
            pipe.transformer, self.params.dssi, style_index, output_index, n_img=2 * output_index.numel()
        )
        if self.state is not None:  # text is padded to max_sequence_length, so positions are known now
            self.state.positions(self.device, self.params.max_sequence_length + self.state.n_img)
        tr = pipe.transformer
        self.dssi_layers = (
            []
            if self.state is None
            else select_layers(self.params.dssi.layers, len(tr.transformer_blocks), len(tr.single_transformer_blocks))
        )
        if self.params.vae_tiling:
            pipe.vae.enable_tiling()
        if self.params.offload and self.device.type != "cpu":
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            if self.params.offload:
                logger.warning("offload needs an accelerator; running on %s without it", self.device)
            pipe.to(self.device)
        if self.params.attention_backend is not None:  # after install_dssi: it sets every processor's backend
            _set_backend(tr, self.params.attention_backend)
        if self.params.cache == "first_block":
            from diffusers.hooks import FirstBlockCacheConfig

            tr.enable_cache(FirstBlockCacheConfig(threshold=self.params.cache_threshold))
        if self.params.compile:
            tr.compile_repeated_blocks(fullgraph=False)
        self.pipe = pipe
        logger.info(
            "sissi ready: model=%s device=%s dtype=%s dssi=%s layers=%d",
            self.model_spec,
            self.device,
            dtype_name,
            self.params.dssi.mode,
            len(self.dssi_layers),
        )

    # -- inputs ---------------------------------------------------------------------------------------

    def prompt_for(self, prompt: str | None) -> str:
        template = PROMPT_TEMPLATES.get(self.params.prompt_template, self.params.prompt_template)
        return template.replace("{prompt}", str(prompt or "").strip())

    def _canvas(self, style) -> Any:
        from PIL import Image, ImageOps

        if isinstance(style, list | tuple):
            if len(style) != 1:
                raise ValueError(
                    f"{len(style)} style images given; sissi takes exactly one style image per sample"
                    " (a multi-panel layout is not implemented)"
                )
            style = style[0]
        width, height = self.params.panel_size
        panel = ImageOps.fit(_to_rgb(style), (width, height), method=Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (2 * width, height), (127, 127, 127))
        canvas.paste(panel, (0, 0))
        return canvas

    def _mask(self) -> Any:
        from PIL import Image

        width, height = self.params.panel_size
        mask = Image.new("L", (2 * width, height), 0)
        mask.paste(255, (width, 0, 2 * width, height))
        return mask

    # -- running ----------------------------------------------------------------------------------------

    def _on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if self.state is not None:
            self.state.set_step(step + 1, self.params.steps)
        return {}

    @torch.inference_mode()
    def generate(self, prompts: list[str], canvases: list, seeds: list[int]) -> np.ndarray:
        """Run FluxFill on the diptychs; float32 target panels ``(B, H, W, 3)`` in [0, 1]."""
        width, height = self.params.panel_size
        if self.state is not None:
            self.state.set_step(0, self.params.steps)
            if self.state.stats is not None:
                self.state.stats.clear()
            self.state.prompt_len = self.prompt_lengths(prompts) if self.state.config.text_tokens == "prompt" else None
        tr = self.pipe.transformer
        caching = self.params.cache != "off"
        if caching:  # each call starts cold: no residual carried over from the previous batch
            tr._reset_stateful_cache()
        with tr.cache_context("cond") if caching else contextlib.nullcontext():
            result = self._pipe_call(prompts, canvases, seeds)
        return np.asarray(result.images, dtype=np.float32)[:, :, width:, :]

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        """T5 tokens of each prompt, end token included, as FluxPipeline tokenizes it (padding excluded)."""
        tokens = self.pipe.tokenizer_2(
            prompts,
            padding="max_length",
            max_length=self.params.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        )
        return [int(n) for n in tokens.attention_mask.sum(dim=1)]

    def _pipe_call(self, prompts: list[str], canvases: list, seeds: list[int]):
        width, height = self.params.panel_size
        return self.pipe(
            prompt=prompts,
            image=canvases,
            mask_image=self._mask(),
            height=height,
            width=2 * width,
            num_inference_steps=self.params.steps,
            guidance_scale=self.params.guidance,
            max_sequence_length=self.params.max_sequence_length,
            generator=[torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds],
            output_type="np",
            callback_on_step_end=self._on_step_end,
            callback_on_step_end_tensor_inputs=[],
        )

    def _stats_per_item(self, n_items: int) -> list[dict[str, Any]] | None:
        if self.state is None or self.state.stats is None:
            return None
        records = self.state.stats
        if not records:
            return [{"calls": 0} for _ in range(n_items)]
        stacked = torch.stack([r[2] for r in records])  # (calls, B, 4)
        layers = sorted({r[0] for r in records})
        out = []
        for b in range(n_items):
            mean = stacked[:, b].mean(dim=0).tolist()
            per_layer = {
                str(layer): round(float(torch.stack([r[2][b, 3] for r in records if r[0] == layer]).mean()), 6)
                for layer in layers
            }
            out.append(
                {
                    "calls": len(records),
                    "steps": sorted({r[1] for r in records}),
                    "alpha_text": mean[0],
                    "alpha_style": mean[1],
                    "alpha_self": mean[2],
                    "lambda": mean[3],
                    "lambda_per_layer": per_layer,
                    "lambda_per_step": self._lambda_per_step(records, b),
                }
            )
        return out

    def _lambda_per_step(self, records, b: int) -> dict[str, dict[str, dict[str, float]]]:
        """``{group: {step: {mean, min, max}}}`` of item b's lambda, groups ``double`` and ``single`` layers."""
        groups: dict[str, dict[int, list[torch.Tensor]]] = {}
        for layer, step, row in records:
            group = "double" if layer < self.state.n_double else "single"
            groups.setdefault(group, {}).setdefault(step, []).append(row[b])
        out: dict[str, dict[str, dict[str, float]]] = {}
        for group, steps in groups.items():
            out[group] = {}
            for step, rows in sorted(steps.items()):
                stack = torch.stack(rows)  # (layers, 6): masses, lambda mean/min/max per layer
                out[group][str(step)] = {
                    "mean": round(float(stack[:, 3].mean()), 6),
                    "min": round(float(stack[:, 4].min()), 6),
                    "max": round(float(stack[:, 5].max()), 6),
                }
        return out

    def _meta(self, item: dict[str, Any], prompt: str) -> dict[str, Any]:
        p = self.params
        return {
            "operator": self.name,
            "model": self.model_spec,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "seed": int(item["seed"]),
            "prompt": prompt,
            "prompt_template": p.prompt_template,
            "panel_size": list(p.panel_size),
            "canvas_size": [2 * p.panel_size[0], p.panel_size[1]],
            "layout": "style-left/target-right, mask=1 on target",
            "style_fit": "center-crop to panel",
            "steps": p.steps,
            "guidance": p.guidance,
            "max_sequence_length": p.max_sequence_length,
            "offload": p.offload,
            "vae_tiling": p.vae_tiling,
            "compile": p.compile,
            "cache": p.cache,
            **({"cache_threshold": p.cache_threshold} if p.cache != "off" else {}),
            "attention_backend": p.attention_backend,
            "dssi": {
                **asdict(p.dssi),
                "steps": list(p.dssi.steps),
                "resolved_layers": list(self.dssi_layers),
            },
            "content_used": False,
        }

    def _run(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prompts = [self.prompt_for(it.get("prompt")) for it in items]
        arrays = self.generate(prompts, [it["_canvas"] for it in items], [it["seed"] for it in items])
        stats = self._stats_per_item(len(items))
        results = []
        for b, (item, prompt, array) in enumerate(zip(items, prompts, arrays, strict=True)):
            meta = self._meta(item, prompt)
            if stats is not None:
                meta["dssi_stats"] = stats[b]
            if self.state is not None and self.state.prompt_len is not None:
                meta["dssi"]["text_keys"] = self.state.prompt_len[b]
            results.append({"key": item["key"], "image": _to_pil(array), "meta": meta})
        return results

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One result per item, same order; a sample that cannot be made gets ``{"key", "error"}``."""
        results: list[dict[str, Any] | None] = [None] * len(items)
        ready = []
        for i, item in enumerate(items):
            try:
                int(item["seed"])
                ready.append((i, {**item, "_canvas": self._canvas(item.get("style"))}))
            except Exception as err:  # noqa: BLE001 - a bad sample becomes a failed row, never a crash
                results[i] = {"key": item.get("key"), "error": f"bad input: {err}"}
        for i, result in _run_with_fallback(self._run, ready, self.device):
            results[i] = result
        return results  # type: ignore[return-value]


def _to_pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8), mode="RGB")


def _run_with_fallback(run, ready: list[tuple[int, dict]], device: torch.device) -> Iterable[tuple[int, dict]]:
    """Run the batch at once; if that fails, item by item so one bad sample fails alone."""
    if not ready:
        return []
    try:
        return list(zip([i for i, _ in ready], run([item for _, item in ready]), strict=True))
    except Exception as err:  # noqa: BLE001
        if len(ready) == 1:
            return [(ready[0][0], {"key": ready[0][1].get("key"), "error": f"{type(err).__name__}: {err}"})]
        logger.warning("sissi batch of %d failed (%s); retrying item by item", len(ready), err)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = []
    for i, item in ready:
        out.extend((i, r) for _, r in _run_with_fallback(run, [(0, item)], device))
    return out
