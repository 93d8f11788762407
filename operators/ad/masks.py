"""Mask-controlled texture synthesis (the authors' ``source_mask``/``target_mask`` of ``optimize``).

Two label images: ``source`` is aligned with the style image, ``target`` with the output. In the AD loss a target
token attends only the style tokens of its own label: ``attn_mask[i, j] = target[i] == source[j]`` after both label
maps are nearest-resized to each layer's token grid (docs/research/ad.md §1.3). Beyond the authors' code, which assumes
square grids, one style image and equal token counts: any aspect ratio (the grid is the latent's, divided by the
layer's down-sampling), a style of another size, and several styles (the source map applies to each). A query
row whose label has no style token left at a coarse layer attends every style token instead of none (the authors'
code would give NaN there).

A label is a colour: RGB images are read as ``r << 16 | g << 8 | b`` (exact in float32), so a grey-scale map
with values 0, 1, 2 ... and a colour-coded one both work.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def read_labels(path: str) -> torch.Tensor:
    """A label image (local path or fsspec URL) -> ``(H, W)`` float32 labels."""
    import fsspec

    with fsspec.open(path, "rb") as f:
        image = Image.open(io.BytesIO(f.read()))
        image.load()
    rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.int64).copy())
    return (rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]).float()


def token_grid(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The ``(rows, cols)`` token grid of a layer with ``tokens`` tokens over a latent of ``latent_hw``."""
    h, w = latent_hw
    factor = math.sqrt(h * w / tokens)
    rows, cols = round(h / factor), round(w / factor)
    if rows * cols != tokens:
        raise ValueError(f"cannot place {tokens} tokens on a {h}x{w} latent")
    return rows, cols


def _resized(labels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(labels[None, None], size=grid, mode="nearest").flatten()


class LabelMasks:
    """Per-layer boolean masks ``(N_target, styles * N_style)`` for the AD loss, built once per token count."""

    def __init__(self, target: torch.Tensor, source: torch.Tensor) -> None:
        missing = sorted(set(target.unique().tolist()) - set(source.unique().tolist()))
        if missing:
            raise ValueError(f"target_mask has {len(missing)} label(s) absent from source_mask (e.g. colour "
                             f"#{int(missing[0]):06x}): every target region needs a style region")
        self.target, self.source = target, source
        self._cache: dict[tuple, torch.Tensor] = {}

    def layer_mask(self, latent_hw: tuple[int, int], style_hw: tuple[int, int], n_target: int, n_style: int,
                   styles: int, device: torch.device) -> torch.Tensor:
        key = (latent_hw, style_hw, n_target, n_style, styles, str(device))
        if key not in self._cache:
            t = _resized(self.target, token_grid(latent_hw, n_target))
            s = _resized(self.source, token_grid(style_hw, n_style)).repeat(styles)
            mask = t[:, None] == s[None, :]
            mask[~mask.any(dim=1)] = True  # a label lost at this resolution: attend everything, not nothing
            self._cache[key] = mask.to(device)
        return self._cache[key]
