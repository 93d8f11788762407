"""PIL <-> tensor conversions of the AD operators (the authors' resize and save rounding)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def pil_to_tensor(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL -> ``(1,3,H,W)`` float32 in [0,1] (bicubic resize to ``size`` = (width, height) when it differs)."""
    image = image.convert("RGB")
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0).float().div(255)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(N,3,H,W)`` in [0,1] -> PIL images (same rounding as torchvision's save_image)."""
    array = images.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]
