"""Small helpers shared by the unit tests: data paths, image builders, a reference Lab conversion."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tests.data_paths import samples_dir

REPO = Path(__file__).resolve().parents[1]
SAMPLES = samples_dir()
DEMO = REPO / "data" / "demo"


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(im: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def solid_png(color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> bytes:
    return png_bytes(Image.new("RGB", size, color))


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bilevel_png(width: int, height: int, *, with_data: bool = True) -> bytes:
    """A 1-bit grayscale PNG written by hand (PNG spec: signature, IHDR, IDAT, IEND).

    Huge dimensions stay tiny on disk because the all-black rows compress to almost nothing. With
    ``with_data=False`` the IDAT is garbage: only a decoder that never reads pixels can get past it.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    if with_data:
        row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
        comp = zlib.compressobj(9)
        parts = [comp.compress(row) for _ in range(height)]
        idat = b"".join(parts) + comp.flush()
    else:
        idat = b"not zlib data"
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


# sRGB (D50-adapted, Bradford) -> XYZ, and the D50 white: the same colour space lcms' "LAB" profile uses.
_SRGB_TO_XYZ_D50 = np.array(
    [[0.4360747, 0.3850649, 0.1430804], [0.2225045, 0.7168786, 0.0606169], [0.0139322, 0.0971045, 0.7141733]]
)
_WHITE_D50 = np.array([0.96422, 1.0, 0.82521])


def lab_pixels(im: Image.Image) -> np.ndarray:
    """CIELAB (D50) of every pixel as an (N, 3) float array, computed with numpy from the CIE formulas."""
    x = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
    lin = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _SRGB_TO_XYZ_D50.T / _WHITE_D50
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    lab = np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)
    return lab.reshape(-1, 3)


def wds_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """A WebDataset tar at ``path``: ``{sample key: {extension: bytes}}``, members in that order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path
