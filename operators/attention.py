"""Shared attention machinery: diffusers attention processors that tap self-attention Q/K/V.

Why processors and not a patched ``forward``: ``set_attn_processor`` is the supported extension point, it can be
undone, and it composes with diffusers' gradient checkpointing. The authors' code patches ``Attention.forward``
and counts self-attention calls as they execute; we keep that *execution order* (down, mid, up) as the layer
index, because ``unet.attn_processors`` lists ``up_blocks`` before ``mid_block`` (docs/research/ad.md §1.1 trap).

The helpers that do not depend on the UNet layout (:func:`split_heads`, :func:`merge_heads`, :class:`LayerFeatures`,
:class:`AttentionTap`) are meant to be reused by other processors (e.g. a Flux one) later.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# (layer index, q, k, v) -> (q, k, v); lets a caller replace the attention inputs of tapped layers.
Override = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a processor to end a forward right after the last tapped layer (nothing after it is needed)."""


@dataclass
class LayerFeatures:
    """Self-attention tensors of one layer, all ``(batch, heads, tokens, head_dim)``; ``out`` is pre-``to_out``."""

    index: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, H*D) -> (B, H, N, D)``, the layout SDPA and the AD loss use."""
    batch = x.shape[0]
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, D) -> (B, N, H*D)``."""
    batch, heads, _, dim = x.shape
    return x.transpose(1, 2).reshape(batch, -1, heads * dim)


class AttentionTap:
    """State shared by all processors of one model: which self-attention layers to record in the current forward.

    Layers are counted per forward in execution order. Outside :meth:`capture` the processors compute plain
    attention and record nothing, which is also what happens when gradient checkpointing recomputes a block
    during backward (the recorded tensors must not be replaced then).
    """

    def __init__(self) -> None:
        self.num_self_layers = 0
        self.names: dict[int, str] = {}  # module id -> qualified name, for tracing
        self.trace: list[str] = []  # self-attention module names in execution order of the last capture
        self._active = False
        self._count = 0
        self._layers: frozenset[int] = frozenset()
        self._stop_after: int | None = None
        self._override: Override | None = None
        self._records: dict[int, LayerFeatures] = {}

    @contextlib.contextmanager
    def capture(
        self, layers: Iterable[int], *, stop_early: bool = False, override: Override | None = None
    ) -> Iterator[AttentionTap]:
        """Record ``layers`` during the forwards run inside the block; ``stop_early`` ends a forward after the last one.

        With ``stop_early`` wrap the forward in :meth:`run` (or catch :class:`StopForward`).
        """
        self._layers = frozenset(int(i) for i in layers)
        self._stop_after = max(self._layers) if stop_early and self._layers else None
        self._override = override
        self._records = {}
        self._count = 0
        self.trace = []
        self._active = True
        try:
            yield self
        finally:
            self._active = False
            self._override = None

    def new_forward(self) -> None:
        """Reset the execution counter; called before every forward of the tapped model."""
        self._count = 0
        self._records = {}
        self.trace = []

    def run(self, fn: Callable[[], object]) -> list[LayerFeatures]:
        """Run one forward ``fn`` inside an active capture and return the recorded layers in index order."""
        self.new_forward()
        try:
            fn()
        except StopForward:
            pass
        return self.features()

    def features(self) -> list[LayerFeatures]:
        missing = sorted(self._layers - set(self._records))
        if missing:
            raise RuntimeError(f"self-attention layers {missing} were not executed (model has {self._count} run)")
        return [self._records[i] for i in sorted(self._records)]

    # called by processors --------------------------------------------------------------------------------
    def _next_index(self, module: nn.Module) -> int | None:
        """Index of this self-attention call if it is to be recorded, else None."""
        if not self._active:
            return None
        index = self._count
        self._count += 1
        self.trace.append(self.names.get(id(module), "?"))
        return index if index in self._layers else None

    def _record(self, feats: LayerFeatures) -> None:
        self._records[feats.index] = feats

    def _should_stop(self, index: int) -> bool:
        return self._stop_after is not None and index == self._stop_after


class TapAttnProcessor:
    """``AttnProcessor2_0`` numerics (the authors' patched forward is identical) plus the self-attention tap.

    The same operations run whether a layer is recorded or not, so a checkpointed block recomputes exactly the
    tensors it saved.
    """

    def __init__(self, tap: AttentionTap) -> None:
        self.tap = tap

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        is_self = encoder_hidden_states is None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if is_self else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if is_self:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (split_heads(x, attn.heads) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        index = self.tap._next_index(attn) if is_self else None
        if index is not None and self.tap._override is not None:
            query, key, value = self.tap._override(index, query, key, value)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        if index is not None:
            self.tap._record(LayerFeatures(index, query, key, value, out))
            if self.tap._should_stop(index):
                raise StopForward

        hidden_states = merge_heads(out).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that take an attention processor, with the names ``set_attn_processor`` expects."""
    return [(name, module) for name, module in model.named_modules() if hasattr(module, "set_processor")]


def install_tap(model: nn.Module) -> AttentionTap:
    """Install :class:`TapAttnProcessor` on every attention module of ``model`` (a UNet) and return the tap.

    Idempotent: a model that already has a tap keeps it.
    """
    existing = getattr(model, "_stylegen_tap", None)
    if isinstance(existing, AttentionTap):
        return existing
    tap = AttentionTap()
    modules = _attention_modules(model)
    processor = TapAttnProcessor(tap)
    model.set_attn_processor({f"{name}.processor": processor for name, _ in modules})
    tap.names = {id(module): name for name, module in modules}
    tap.num_self_layers = sum(1 for _, m in modules if not getattr(m, "is_cross_attention", False))
    model._stylegen_tap = tap
    log.debug("installed attention tap on %d attention modules (%d self)", len(modules), tap.num_self_layers)
    return tap


def self_attention_order(model: nn.Module, forward: Callable[[], object]) -> list[str]:
    """Names of the self-attention modules in execution order, found by running ``forward`` once."""
    tap = install_tap(model)
    with tap.capture(()):
        tap.new_forward()
        with torch.no_grad():
            forward()
        return list(tap.trace)


def flux_joint_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                   image_rotary_emb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V of a FLUX joint attention exactly as the installed diffusers' ``FluxAttnProcessor`` feeds them to
    attention: ``(B, L, heads, head_dim)`` after QK-RMSNorm and RoPE, text tokens first in double-stream blocks.
    Shared by the Sissi (DSSI) and the FLUX AD processors, which differ only in what they do with them."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    query, key, value, enc_q, enc_k, enc_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if attn.added_kv_proj_dim is not None:
        enc_q = attn.norm_added_q(enc_q.unflatten(-1, (-1, attn.head_dim)))
        enc_k = attn.norm_added_k(enc_k.unflatten(-1, (-1, attn.head_dim)))
        enc_v = enc_v.unflatten(-1, (-1, attn.head_dim))
        query = torch.cat([enc_q, query], dim=1)
        key = torch.cat([enc_k, key], dim=1)
        value = torch.cat([enc_v, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value
