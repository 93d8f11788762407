"""``color-transfer``: the weight-free baseline. Matches the per-channel mean and standard deviation of
the content image to the style image in CIELAB (Reinhard et al. 2001), so the demo and the pipeline
tests produce real-looking stylized images on any laptop without model weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageCms

_SRGB = ImageCms.createProfile("sRGB")
_LAB = ImageCms.createProfile("LAB")
_TO_LAB = ImageCms.buildTransformFromOpenProfiles(_SRGB, _LAB, "RGB", "LAB")
_TO_RGB = ImageCms.buildTransformFromOpenProfiles(_LAB, _SRGB, "LAB", "RGB")


def _lab(im: Image.Image) -> np.ndarray:
    """L in 0..255 and signed a*, b*: Pillow stores a* and b* of 8-bit LAB as signed bytes."""
    raw = np.asarray(ImageCms.applyTransform(im.convert("RGB"), _TO_LAB))
    lab = raw.astype(np.float32)
    lab[..., 1:] = raw[..., 1:].view(np.int8)
    return lab


def _from_lab(lab: np.ndarray) -> Image.Image:
    out = np.empty(lab.shape, dtype=np.uint8)
    out[..., 0] = np.clip(lab[..., 0] + 0.5, 0, 255).astype(np.uint8)
    out[..., 1:] = np.clip(np.round(lab[..., 1:]), -128, 127).astype(np.int8).view(np.uint8)
    return ImageCms.applyTransform(Image.fromarray(out, "LAB"), _TO_RGB)


def transfer_statistics(content: Image.Image, style: Image.Image, strength: float = 1.0) -> Image.Image:
    """Content image with the style's Lab mean/std; ``strength`` blends from content (0) to full (1)."""
    c = _lab(content)
    s = _lab(style)
    c_mean, c_std = c.reshape(-1, 3).mean(0), c.reshape(-1, 3).std(0)
    s_mean, s_std = s.reshape(-1, 3).mean(0), s.reshape(-1, 3).std(0)
    out = (c - c_mean) * (s_std / np.maximum(c_std, 1e-3)) + s_mean
    return _from_lab(c + strength * (out - c))


class ColorTransfer:
    """Operator wrapper (see ``operators.build_operator``)."""

    name = "color-transfer"

    def __init__(self, model: str | None = None, params: dict[str, Any] | None = None, device: str = "cpu"):
        self.check_params(params)
        self.strength = float((params or {}).get("strength", 1.0))

    @staticmethod
    def check_params(params: dict[str, Any] | None) -> None:
        params = dict(params or {})
        unknown = sorted(set(params) - {"strength"})
        if unknown:
            raise ValueError(f"color-transfer: unknown param {unknown[0]!r}; known: strength")
        try:
            strength = float(params.get("strength", 1.0))
        except (TypeError, ValueError):
            raise ValueError(f"color-transfer: strength must be a number, got {params['strength']!r}") from None
        if not 0.0 <= strength <= 1.0:
            raise ValueError("color-transfer: strength must be in [0, 1]")

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results = []
        for item in items:
            style = item["style"][0] if isinstance(item["style"], list) else item["style"]
            if item.get("content") is None:
                results.append({"key": item["key"], "error": "color-transfer needs a content image"})
                continue
            image = transfer_statistics(item["content"], style, self.strength)
            meta = {"operator": self.name, "space": "CIELAB", "strength": self.strength}
            results.append({"key": item["key"], "image": image, "meta": meta})
        return results
