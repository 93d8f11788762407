"""Generate the small demo inputs shipped in ``data/demo/``.

Why this exists: the repository needs a handful of content images, style images and text prompts for
demos, docs and smoke tests, but it must not ship third-party pictures with unclear licensing. Everything
here is drawn procedurally with Pillow and numpy, so the files are tiny, free of any licence question
(CC0), and can be regenerated at any time. Every random draw comes from ``numpy.random.default_rng`` with
a fixed seed, so running the script twice produces byte-identical files.

Usage::

    python scripts/make_demo_data.py            # writes into data/demo/ next to this repo
    python scripts/make_demo_data.py --out DIR  # writes somewhere else

Outputs:

* ``content/*.jpg``  - 6 simple recognisable scenes (JPEG, quality 85)
* ``style/*.png``    - 6 textures with distinctive palettes (PNG)
* ``prompts.txt``    - one caption per content image, in sorted file-name order
* ``captions.jsonl`` - ``{"image": "content/<file>", "prompt": "<caption>"}`` per content image
* ``LICENSE.md``     - provenance and CC0 note
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SEED = 20240607
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "data" / "demo"
JPEG_QUALITY = 85
STYLE_SIZE = 160
STYLE_COLOURS = 32  # style PNGs are palette-quantised to keep them small

RGB = tuple[int, int, int]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def vertical_gradient(w: int, h: int, top: RGB, bottom: RGB) -> Image.Image:
    t = np.linspace(0.0, 1.0, h, dtype=np.float64)[:, None, None]
    a = np.array(top, dtype=np.float64)[None, None, :]
    b = np.array(bottom, dtype=np.float64)[None, None, :]
    rows = a * (1.0 - t) + b * t
    arr = np.broadcast_to(rows, (h, w, 3))
    return Image.fromarray(np.round(arr).astype(np.uint8), "RGB")


def add_noise(img: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64)
    arr = arr + rng.normal(0.0, sigma, size=arr.shape[:2])[:, :, None]
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "RGB")


def hill_polygon(
    w: int, h: int, base: float, amp: float, freq: float, phase: float
) -> list[tuple[float, float]]:
    pts = [(0.0, float(h))]
    for x in range(0, w + 1, 4):
        y = base - amp * math.sin(freq * x / w * 2 * math.pi + phase)
        pts.append((float(x), y))
    pts.append((float(w), float(h)))
    return pts


# --------------------------------------------------------------------------------------------------
# content scenes (each returns an RGB image); names are the subject of the picture
# --------------------------------------------------------------------------------------------------


def scene_hills(rng: np.random.Generator) -> Image.Image:
    w, h = 224, 160
    img = vertical_gradient(w, h, (70, 130, 220), (200, 225, 250))
    d = ImageDraw.Draw(img)
    # sun with a soft halo
    d.ellipse((150, 18, 190, 58), fill=(255, 236, 150))
    d.ellipse((156, 24, 184, 52), fill=(255, 214, 60))
    # a couple of clouds
    for cx, cy in ((50, 30), (100, 45)):
        for dx, dy, r in ((0, 0, 10), (10, -4, 12), (22, 0, 10)):
            d.ellipse((cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r), fill=(250, 250, 252))
    # three layers of hills, far to near
    layers = ((95, 14, 1.2, (110, 160, 110)), (112, 16, 0.8, (70, 140, 60)), (132, 12, 1.6, (40, 110, 40)))
    for base, amp, freq, colour in layers:
        phase = float(rng.uniform(0, 2 * math.pi))
        d.polygon(hill_polygon(w, h, base, amp, freq, phase), fill=colour)
    return img


def scene_house(rng: np.random.Generator) -> Image.Image:
    s = 192
    img = vertical_gradient(s, s, (120, 180, 235), (215, 235, 250))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 150, s, s), fill=(80, 160, 70))  # lawn
    d.rectangle((46, 92, 146, 156), fill=(235, 215, 170))  # walls
    d.polygon([(36, 94), (96, 44), (156, 94)], fill=(190, 40, 35))  # red roof
    d.rectangle((120, 52, 132, 78), fill=(120, 70, 50))  # chimney
    d.rectangle((84, 118, 108, 156), fill=(110, 65, 35))  # door
    d.ellipse((101, 136, 105, 140), fill=(230, 200, 80))  # door knob
    for x0 in (56, 118):  # windows with crossbars
        d.rectangle((x0, 104, x0 + 20, 124), fill=(170, 215, 245), outline=(255, 255, 255), width=2)
        d.line((x0 + 10, 104, x0 + 10, 124), fill=(255, 255, 255), width=2)
        d.line((x0, 114, x0 + 20, 114), fill=(255, 255, 255), width=2)
    d.rectangle((88, 156, 104, s), fill=(180, 170, 150))  # path
    # a few flowers on the lawn
    for _ in range(14):
        x = int(rng.integers(4, s - 4))
        y = int(rng.integers(160, s - 3))
        colour = [(250, 240, 90), (250, 120, 160), (255, 255, 255)][int(rng.integers(0, 3))]
        d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    return img


def scene_lighthouse(rng: np.random.Generator) -> Image.Image:
    s = 192
    img = vertical_gradient(s, s, (250, 190, 130), (150, 190, 230))
    d = ImageDraw.Draw(img)
    # sea with light wave lines
    sea = vertical_gradient(s, s - 120, (40, 100, 160), (20, 60, 110))
    img.paste(sea, (0, 120))
    for _ in range(22):
        x = int(rng.integers(0, s - 16))
        y = int(rng.integers(126, s - 2))
        d.line((x, y, x + int(rng.integers(6, 16)), y), fill=(150, 200, 235), width=1)
    # rocky island
    d.polygon([(70, 126), (96, 108), (150, 110), (176, 128)], fill=(95, 85, 80))
    # tapered tower with red and white bands
    top_y, base_y = 46, 116

    def half(yy: float) -> float:  # half-width of the tower at height yy
        return 8 + 6 * (yy - top_y) / (base_y - top_y)

    for i, y in enumerate(range(top_y, base_y, 14)):
        y2 = min(y + 14, base_y)
        colour = (200, 30, 30) if i % 2 == 0 else (245, 245, 245)
        d.polygon(
            [(120 - half(y), y), (120 + half(y), y), (120 + half(y2), y2), (120 - half(y2), y2)], fill=colour
        )
    d.rectangle((108, 36, 132, 46), fill=(40, 40, 45))  # gallery
    d.rectangle((113, 22, 127, 36), fill=(255, 240, 140))  # lantern room
    d.polygon([(110, 22), (120, 12), (130, 22)], fill=(40, 40, 45))  # cap
    # light beams
    d.polygon([(113, 29), (20, 10), (20, 40)], fill=(255, 245, 190))
    d.polygon([(127, 29), (192, 18), (192, 42)], fill=(255, 245, 190))
    return img


def scene_tree(rng: np.random.Generator) -> Image.Image:
    s = 192
    img = vertical_gradient(s, s, (140, 200, 245), (225, 240, 250))
    d = ImageDraw.Draw(img)
    meadow = vertical_gradient(s, 62, (120, 190, 80), (70, 150, 50))
    img.paste(meadow, (0, 130))
    # grass blades
    for _ in range(120):
        x = int(rng.integers(0, s))
        y = int(rng.integers(134, s))
        d.line((x, y, x + int(rng.integers(-2, 3)), y - int(rng.integers(3, 7))), fill=(50, 120, 40))
    # trunk and branches
    d.polygon([(88, 150), (104, 150), (100, 90), (92, 90)], fill=(110, 70, 40))
    d.line((96, 104, 74, 84), fill=(110, 70, 40), width=5)
    d.line((96, 98, 120, 80), fill=(110, 70, 40), width=5)
    # crown made of overlapping leafy blobs
    for _ in range(26):
        cx = 96 + float(rng.normal(0, 22))
        cy = 66 + float(rng.normal(0, 14))
        r = float(rng.uniform(12, 20))
        g = int(rng.integers(110, 165))
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(30, g, 40))
    # a few red apples
    for _ in range(7):
        cx = 96 + float(rng.normal(0, 20))
        cy = 70 + float(rng.normal(0, 12))
        d.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=(210, 30, 30))
    return img


def scene_cat(rng: np.random.Generator) -> Image.Image:
    s = 192
    img = vertical_gradient(s, s, (235, 220, 245), (200, 185, 225))
    d = ImageDraw.Draw(img)
    fur, inner = (235, 150, 60), (250, 190, 180)
    d.polygon([(40, 80), (52, 18), (92, 60)], fill=fur)  # left ear
    d.polygon([(152, 80), (140, 18), (100, 60)], fill=fur)  # right ear
    d.polygon([(52, 70), (58, 34), (80, 58)], fill=inner)
    d.polygon([(140, 70), (134, 34), (112, 58)], fill=inner)
    d.ellipse((30, 44, 162, 170), fill=fur)  # head
    # tabby stripes on the forehead
    for dx in (-14, 0, 14):
        d.line((96 + dx, 50, 96 + dx * 0.6, 76), fill=(190, 100, 30), width=4)
    d.ellipse((40, 112, 86, 150), fill=(250, 235, 215))  # muzzle cheeks
    d.ellipse((106, 112, 152, 150), fill=(250, 235, 215))
    d.ellipse((76, 118, 116, 156), fill=(250, 235, 215))
    for ex in (68, 124):  # eyes
        d.ellipse((ex - 14, 86, ex + 14, 110), fill=(120, 200, 90))
        d.ellipse((ex - 4, 87, ex + 4, 109), fill=(20, 20, 20))
        d.ellipse((ex + 3, 91, ex + 7, 95), fill=(255, 255, 255))
    d.polygon([(88, 116), (104, 116), (96, 126)], fill=(230, 110, 130))  # nose
    d.line((96, 126, 96, 134), fill=(60, 40, 30), width=2)
    d.arc((80, 126, 96, 142), 0, 180, fill=(60, 40, 30), width=2)
    d.arc((96, 126, 112, 142), 0, 180, fill=(60, 40, 30), width=2)
    for side in (-1, 1):  # whiskers
        for k, dy in enumerate((-6, 0, 6)):
            jitter = float(rng.uniform(-2, 2))
            x0 = 96 + side * 26
            d.line(
                (x0, 132 + dy, x0 + side * (58 + 4 * k), 126 + 2 * dy + jitter), fill=(70, 50, 40), width=1
            )
    return img


def scene_skyline(rng: np.random.Generator) -> Image.Image:
    w, h = 224, 160
    img = vertical_gradient(w, h, (8, 10, 40), (50, 40, 100))
    d = ImageDraw.Draw(img)
    for _ in range(45):  # stars
        x = int(rng.integers(0, w))
        y = int(rng.integers(0, 80))
        b = int(rng.integers(150, 256))
        d.point((x, y), fill=(b, b, b))
    d.ellipse((170, 14, 196, 40), fill=(245, 240, 210))  # moon
    d.ellipse((178, 10, 202, 36), fill=(14, 16, 48))  # crescent cut-out
    x = 0
    while x < w:
        bw = int(rng.integers(18, 34))
        top = int(rng.integers(50, 118))
        shade = int(rng.integers(20, 45))
        d.rectangle((x, top, x + bw - 2, h), fill=(shade, shade, shade + 15))
        if rng.random() < 0.3:  # antenna
            d.line(
                (x + bw // 2, top, x + bw // 2, top - 12), fill=(shade + 20, shade + 20, shade + 30), width=1
            )
        for wy in range(top + 5, h - 4, 8):  # lit windows
            for wx in range(x + 3, x + bw - 5, 6):
                if rng.random() < 0.4:
                    d.rectangle((wx, wy, wx + 2, wy + 3), fill=(255, 220, 110))
        x += bw
    d.rectangle((0, h - 8, w, h), fill=(10, 10, 20))  # street
    return img


# name -> (draw function, caption). The caption order in prompts.txt follows sorted file names.
CONTENT: dict[str, tuple[Callable[[np.random.Generator], Image.Image], str]] = {
    "cat.jpg": (scene_cat, "a ginger cat face with green eyes"),
    "hills.jpg": (scene_hills, "green rolling hills under a blue sky with a bright sun"),
    "house.jpg": (scene_house, "a small house with a red roof and white windows"),
    "lighthouse.jpg": (scene_lighthouse, "a red and white lighthouse by the sea at sunset"),
    "skyline.jpg": (scene_skyline, "a city skyline at night with lit windows and a crescent moon"),
    "tree.jpg": (scene_tree, "an apple tree on a green meadow"),
}


# --------------------------------------------------------------------------------------------------
# style textures (each returns a 160x160 RGB image); names describe the look
# --------------------------------------------------------------------------------------------------


def style_sunset_stripes(rng: np.random.Generator) -> Image.Image:
    s = STYLE_SIZE
    palette = np.array(
        [(255, 94, 58), (255, 149, 0), (255, 204, 92), (232, 65, 94), (140, 40, 110), (255, 170, 120)],
        dtype=np.float64,
    )
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    wave = yy + 6.0 * np.sin(xx / 14.0 + float(rng.uniform(0, 2 * math.pi)))
    idx = (wave // 14).astype(int) % len(palette)
    arr = palette[idx]
    arr = arr + rng.normal(0.0, 12.0, size=(s, s))[:, :, None]
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "RGB")


def style_blue_mosaic(rng: np.random.Generator) -> Image.Image:
    s, tile = STYLE_SIZE, 16
    img = Image.new("RGB", (s, s), (235, 240, 245))  # grout
    d = ImageDraw.Draw(img)
    blues = [(20, 60, 140), (40, 100, 190), (90, 150, 220), (230, 240, 250), (160, 200, 235)]
    for ty in range(0, s, tile):
        for tx in range(0, s, tile):
            colour = blues[int(rng.integers(0, len(blues)))]
            j = rng.integers(-1, 2, size=4)
            d.rectangle(
                (tx + 1 + j[0], ty + 1 + j[1], tx + tile - 2 + j[2], ty + tile - 2 + j[3]), fill=colour
            )
            if rng.random() < 0.25:  # occasional painted motif
                d.ellipse((tx + 5, ty + 5, tx + tile - 6, ty + tile - 6), fill=(250, 250, 255))
    return add_noise(img, rng, 5.0)


def style_forest_brush(rng: np.random.Generator) -> Image.Image:
    s = STYLE_SIZE
    img = Image.new("RGB", (s, s), (120, 110, 70))
    d = ImageDraw.Draw(img)
    colours = [(60, 90, 40), (90, 120, 50), (120, 85, 45), (150, 130, 70), (40, 60, 30), (170, 160, 90)]
    for _ in range(420):  # short thick strokes in random directions
        x, y = rng.uniform(-10, s + 10, size=2)
        ang = float(rng.normal(0.6, 0.5))
        length = float(rng.uniform(8, 22))
        colour = colours[int(rng.integers(0, len(colours)))]
        x2, y2 = x + length * math.cos(ang), y + length * math.sin(ang)
        d.line((float(x), float(y), x2, y2), fill=colour, width=int(rng.integers(3, 8)))
    img = img.filter(ImageFilter.GaussianBlur(0.8))
    return add_noise(img, rng, 6.0)


def style_pastel_dots(rng: np.random.Generator) -> Image.Image:
    s, step = STYLE_SIZE, 20
    img = Image.new("RGB", (s, s), (255, 250, 235))
    d = ImageDraw.Draw(img)
    pastels = [
        (255, 179, 186),
        (255, 223, 186),
        (255, 255, 186),
        (186, 255, 201),
        (186, 225, 255),
        (220, 190, 255),
    ]
    # quadrants with a different background colour, pop-art style
    for qy in (0, 1):
        for qx in (0, 1):
            bg = pastels[int(rng.integers(0, len(pastels)))]
            d.rectangle((qx * s // 2, qy * s // 2, (qx + 1) * s // 2, (qy + 1) * s // 2), fill=bg)
    for gy in range(s // step + 1):
        for gx in range(s // step + 1):
            cx = gx * step + (step // 2 if gy % 2 else 0)
            cy = gy * step
            r = float(rng.uniform(5, 8.5))
            colour = pastels[int(rng.integers(0, len(pastels)))]
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=(60, 60, 80), width=2)
    return img


def style_starry_swirl(rng: np.random.Generator) -> Image.Image:
    s = STYLE_SIZE
    img = vertical_gradient(s, s, (10, 20, 60), (25, 45, 110))
    d = ImageDraw.Draw(img)
    colours = [(40, 80, 170), (70, 120, 200), (120, 170, 230), (20, 40, 110), (200, 210, 120)]
    centres = [(50.0, 50.0), (118.0, 96.0), (60.0, 130.0)]
    for _ in range(700):  # short strokes tangent to circles around a few swirl centres
        cx, cy = centres[int(rng.integers(0, len(centres)))]
        r = float(rng.uniform(6, 60))
        a = float(rng.uniform(0, 2 * math.pi))
        x, y = cx + r * math.cos(a), cy + r * math.sin(a)
        da = 7.0 / r
        x2, y2 = cx + r * math.cos(a + da), cy + r * math.sin(a + da)
        colour = colours[int(rng.integers(0, len(colours)))]
        d.line((x, y, x2, y2), fill=colour, width=int(rng.integers(2, 4)))
    for _ in range(9):  # glowing stars
        x, y = rng.uniform(8, s - 8, size=2)
        r = float(rng.uniform(3, 6))
        d.ellipse((x - r - 3, y - r - 3, x + r + 3, y + r + 3), fill=(230, 210, 110))
        d.ellipse((x - r, y - r, x + r, y + r), fill=(255, 245, 190))
    return img


def style_woodcut(rng: np.random.Generator) -> Image.Image:
    s = STYLE_SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    cx, cy = rng.uniform(40, 120, size=2)
    dist = np.hypot(xx - cx, yy - cy)
    # concentric "wood grain" rings warped by low-frequency waves, plus gouge noise
    warp = 5.0 * np.sin(yy / 11.0) + 4.0 * np.cos(xx / 17.0)
    grain = np.sin((dist + warp) / 3.2)
    grain = grain + rng.normal(0.0, 0.35, size=(s, s))
    ink = grain > 0.15
    arr = np.empty((s, s, 3), dtype=np.uint8)
    arr[ink] = (20, 10, 10)
    arr[~ink] = (200, 30, 30)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(12):  # bold diagonal cuts
        x = float(rng.uniform(-20, s))
        d.line((x, 0, x + 40, s), fill=(20, 10, 10), width=int(rng.integers(2, 5)))
    return img


STYLE: dict[str, Callable[[np.random.Generator], Image.Image]] = {
    "blue_mosaic.png": style_blue_mosaic,
    "forest_brush.png": style_forest_brush,
    "pastel_dots.png": style_pastel_dots,
    "starry_swirl.png": style_starry_swirl,
    "sunset_stripes.png": style_sunset_stripes,
    "woodcut_red_black.png": style_woodcut,
}


LICENSE_TEXT = """\
# Demo data licence

All images and text in this folder (`content/`, `style/`, `prompts.txt`, `captions.jsonl`) were
generated procedurally by `scripts/make_demo_data.py` for this project. They contain no third-party
material.

They are dedicated to the public domain under
[CC0 1.0 Universal](https://creativecommons.org/publicdomain/zero/1.0/): you may copy, modify and
distribute them for any purpose without asking permission.

Regenerate them (byte-identically) with:

    python scripts/make_demo_data.py
"""


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def build(out: Path, seed: int = SEED) -> list[Path]:
    """Write all demo files below ``out`` and return their paths."""
    content_dir, style_dir = out / "content", out / "style"
    content_dir.mkdir(parents=True, exist_ok=True)
    style_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    # One child generator per image, derived from the master seed, so editing one picture does not
    # change the random draws of the others.
    names = sorted(CONTENT) + sorted(STYLE)
    children = np.random.default_rng(seed).spawn(len(names))
    rngs = dict(zip(names, children, strict=True))

    for name in sorted(CONTENT):
        draw, _ = CONTENT[name]
        path = content_dir / name
        draw(rngs[name]).save(path, "JPEG", quality=JPEG_QUALITY, optimize=True)
        written.append(path)

    for name in sorted(STYLE):
        img = STYLE[name](rngs[name])
        assert img.size == (STYLE_SIZE, STYLE_SIZE), (name, img.size)
        # Reduce to a small palette to keep the file small, but store as plain RGB so that loaders doing
        # np.asarray(Image.open(p)) without .convert("RGB") still get an HxWx3 array.
        img = img.quantize(colors=STYLE_COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        img = img.convert("RGB")
        path = style_dir / name
        img.save(path, "PNG", optimize=True)
        written.append(path)

    prompts = [CONTENT[name][1] for name in sorted(CONTENT)]
    path = out / "prompts.txt"
    path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    written.append(path)

    path = out / "captions.jsonl"
    lines = [json.dumps({"image": f"content/{name}", "prompt": CONTENT[name][1]}) for name in sorted(CONTENT)]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    written.append(path)

    path = out / "LICENSE.md"
    path.write_text(LICENSE_TEXT, encoding="utf-8")
    written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: data/demo)")
    parser.add_argument("--seed", type=int, default=SEED, help="master random seed")
    args = parser.parse_args()
    total = 0
    for path in build(args.out, args.seed):
        size = path.stat().st_size
        total += size
        print(f"{size:8d}  {path.relative_to(args.out)}")
    print(f"{total:8d}  total bytes")


if __name__ == "__main__":
    main()
