"""Image decoding and encoding for the data path.

Decoding is where hostile input meets the pipeline: the pixel limit is checked from the header before
any pixel is allocated, orientation comes from EXIF, and every mode (palette, alpha, CMYK, 16-bit) ends
as 8-bit RGB. Between stages images travel as encoded bytes, which keeps Ray's object store small.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Alpha is composited over this colour (documented in the README).
BACKGROUND = (255, 255, 255)

# decode_image checks the configured max_pixels from the header before any pixel is allocated; Pillow's own
# process-wide limit would otherwise override a larger configured one.
Image.MAX_IMAGE_PIXELS = None


class DecodeError(ValueError):
    """An input that is not a usable image; the sample becomes a `failed` row with this message."""


def decode_image(data: bytes | None, *, max_pixels: int, max_side: int | None = None,
                 max_aspect: float | None = None) -> Image.Image:
    """Decode bytes into an RGB image no larger than ``max_side`` on its longer side.

    Raises only DecodeError: whatever a hostile file makes Pillow throw must fail its own sample, never the
    decode task (a task crash would be retried and then fail the whole run). Size and aspect ratio are
    checked from the header, before any pixel is allocated; ``max_aspect`` refuses slivers such as 4000x2,
    which would shrink to a 1-pixel line at ``max_side`` and blow up again in CLIP's shorter-side resize.
    """
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > max_pixels:
                raise DecodeError(f"image too large: {width}x{height} pixels exceeds max_pixels={max_pixels}")
            if width < 1 or height < 1:
                raise DecodeError(f"image has no pixels: {width}x{height}")
            aspect = max(width, height) / min(width, height)
            if max_aspect and aspect > max_aspect:
                raise DecodeError(f"aspect ratio {aspect:.0f}:1 ({width}x{height}) exceeds max_aspect={max_aspect:g}")
            if max_side and im.format == "JPEG":
                im.draft("RGB", (max_side, max_side))  # decode JPEG at reduced scale: far less work
            im.seek(0)  # first frame of an animation
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = to_rgb(im)
    except DecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(_describe(exc, data)) from None
    except MemoryError:
        raise DecodeError("cannot decode image: out of memory") from None
    except Exception as exc:  # OSError, SyntaxError, struct.error, ... from a malformed file
        raise DecodeError(f"cannot decode image: {exc.__class__.__name__}: {exc}") from None
    if max_side and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return rgb


def _describe(exc: Exception, data: bytes) -> str:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb: {exc}"
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "not an image: HTML document"
    return "not an image: unrecognised format"


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited over BACKGROUND."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def output_problem(image: object) -> str | None:
    """Why an operator's output must not be written (None if it may): not an image, empty, NaN pixels, or
    all black, which is what NaN latents become after the VAE and the uint8 cast. A constant image that is not
    black is kept: a flat input legitimately gives a flat output."""
    if not isinstance(image, Image.Image):
        return f"returned {type(image).__name__}, not a PIL image"
    if image.width < 1 or image.height < 1:
        return f"produced an empty image ({image.width}x{image.height})"
    arr = np.asarray(image)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        return "produced NaN or infinite pixels"
    if not arr.any():
        return "produced an all-black image"
    return None


def encode_image(im: Image.Image, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode an image deterministically: no metadata is carried over from ``im.info`` (an ICC profile made
    by a colour transform holds a creation timestamp), so the same pixels always give the same bytes."""
    buf = io.BytesIO()
    fmt = fmt.lower()
    clean = {"icc_profile": None, "exif": b""}
    if fmt in ("jpg", "jpeg"):
        im.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=False, **clean)
    elif fmt == "webp":
        im.save(buf, format="WEBP", quality=quality, **clean)
    elif fmt == "png":
        im.save(buf, format="PNG", compress_level=6, **clean)
    else:
        raise ValueError(f"unsupported image format {fmt!r}")
    return buf.getvalue()


def encode_transport(im: Image.Image) -> bytes:
    """Lossless and fast: how decoded inputs travel between stages."""
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def open_rgb(data: bytes) -> Image.Image:
    """Open bytes this pipeline encoded itself (already validated, RGB)."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return im.convert("RGB") if im.mode != "RGB" else im
