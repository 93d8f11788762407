"""DSSI inside a diffusers FLUX transformer: the attention processor, the layers that get it, the step gate.

Why a module of its own: it is the only code of the package that knows diffusers' attention-processor contract
(capped in pyproject.toml for that reason); :mod:`~operators.sissi.dssi` stays plain tensors. diffusers is
imported on first use, so importing the package does not import it.
"""

from __future__ import annotations

import functools

import torch

from operators.sissi.dssi import Positions, dssi_attention_at, token_positions
from operators.sissi.params import DSSIConfig


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
        self._cache: dict[tuple[str, int], Positions] = {}

    def positions(self, device: torch.device, n_tokens: int) -> Positions:
        key = (str(device), n_tokens)
        if key not in self._cache:
            text_len = n_tokens - self.n_img
            self._cache[key] = token_positions(n_tokens, text_len, self.style_index, self.output_index, device)
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
                out = dssi_attention_at(
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



def set_backend(transformer, name: str) -> None:
    """Give every attention processor of ``transformer`` the backend, without changing diffusers' process-wide
    active backend (``set_attention_backend`` also sets that, which would reach every other model in the worker)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    previous = _AttentionBackendRegistry._active_backend
    try:
        transformer.set_attention_backend(name)
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)
