"""Generators of hostile and awkward inputs (docs/architecture.md §7 "Hostile input is normal input"), written into a
test's tmp_path: broken and awkward images, hostile WebDataset tars, hostile prompt manifests.

Every generator is deterministic and returns what the pipeline is expected to make of each input, so tests
assert outcomes, not just "did not crash".
"""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tests.unit_helpers import bilevel_png

RED, GREEN, BLUE, WHITE, CYAN = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 255, 255)
BOMB_SIDE = 30_000  # 900 megapixels: 2.7 GB as RGB, ~1 MB on disk


@dataclass(frozen=True)
class Expect:
    """What a hostile input must become: ``failed`` with ``reason`` in the row's reason, or ``kept``, in which
    case ``pixels`` maps (x, y) of the decoded input to its RGB value and ``size`` is its decoded size."""

    status: str
    reason: str = ""
    size: tuple[int, int] | None = None
    pixels: tuple[tuple[tuple[int, int], tuple[int, int, int]], ...] = ()


def encoded(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def rgb16_png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    width, height = size
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    row = b"\x00" + struct.pack(">HHH", *color) * width
    idat = zlib.compress(row * height)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def halves(size: tuple[int, int], left, right, mode: str = "RGB") -> Image.Image:
    """Left half ``left``, right half ``right``."""
    im = Image.new(mode, size, right)
    im.paste(left, (0, 0, size[0] // 2, size[1]))
    return im


def textured(size: tuple[int, int] = (48, 48), seed: int = 0) -> Image.Image:
    """A non-flat image (random blocks), usable as a style or a good content image."""
    rng = random.Random(seed)
    im = Image.new("RGB", size)
    for x in range(0, size[0], 8):
        for y in range(0, size[1], 8):
            im.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 8, y + 8))
    return im


def image_corpus(dest: Path) -> dict[str, Expect]:
    """Write one file per hostile or awkward image into ``dest``; return file name -> expectation
    (pixel expectations are for the decoded input at decode.max_side >= 64)."""
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(6)
    good_jpeg = encoded(textured((64, 64)), "JPEG", quality=90)
    files: dict[str, tuple[bytes, Expect]] = {
        # broken: each a failed row whose reason names the problem
        "zero.jpg": (b"", Expect("failed", "empty file")),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], Expect("failed", "cannot decode image")),
        "random.png": (rng.randbytes(4096), Expect("failed", "not an image")),
        "page.jpg": (b"<!DOCTYPE html><html><body>404 not found</body></html>", Expect("failed", "HTML")),
        "bomb.png": (bilevel_png(BOMB_SIDE, BOMB_SIDE), Expect("failed", f"too large: {BOMB_SIDE}x{BOMB_SIDE}")),
        "sliver.png": (encoded(Image.new("RGB", (4000, 2), RED), "PNG"), Expect("failed", "aspect ratio 2000:1")),
        # awkward: converted to 8-bit RGB, checked on pixel values
        "cmyk.jpg": (encoded(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95),
                     Expect("kept", size=(16, 16), pixels=(((8, 8), CYAN),))),
        "gray16.png": (encoded(Image.new("I;16", (16, 16), 32896), "PNG"),
                       Expect("kept", size=(16, 16), pixels=(((3, 3), (128, 128, 128)),))),
        "rgb16.png": (rgb16_png((16, 16), (65535, 0, 32896)),
                      Expect("kept", size=(16, 16), pixels=(((3, 3), (255, 0, 128)),))),
        "palette.png": (encoded(halves((16, 16), RED, GREEN).quantize(4), "PNG"),
                        Expect("kept", size=(16, 16), pixels=(((2, 8), RED), ((13, 8), GREEN)))),
        "rgba.png": (encoded(halves((16, 16), (0, 0, 0, 0), BLUE + (255,), "RGBA"), "PNG"),
                     Expect("kept", size=(16, 16), pixels=(((2, 8), WHITE), ((13, 8), BLUE)))),
        "anim.gif": (_gif([Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), GREEN)]),
                     Expect("kept", size=(16, 16), pixels=(((8, 8), RED),))),
        # stored 40x20, left red / right blue; EXIF orientation 6 shows it 20x40 with red on top
        "exif6.jpg": (encoded(halves((40, 20), RED, BLUE), "JPEG", quality=95, exif=_orientation(6)),
                      Expect("kept", size=(20, 40), pixels=(((10, 6), RED), ((10, 33), BLUE)))),
        "one.png": (encoded(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
                    Expect("kept", size=(1, 1), pixels=(((0, 0), (10, 200, 30)),))),
        "panorama.png": (encoded(Image.new("RGB", (200, 20), GREEN), "PNG"),  # 10:1 is within max_aspect
                         Expect("kept", size=(64, 6), pixels=(((30, 3), GREEN),))),
        "photo.webp": (encoded(halves((16, 16), RED, BLUE), "WEBP", lossless=True),
                       Expect("kept", size=(16, 16), pixels=(((2, 8), RED), ((13, 8), BLUE)))),
        "photo.bmp": (encoded(halves((16, 16), RED, BLUE), "BMP"),
                      Expect("kept", size=(16, 16), pixels=(((2, 8), RED), ((13, 8), BLUE)))),
        "photo.tiff": (encoded(halves((16, 16), RED, BLUE), "TIFF"),
                       Expect("kept", size=(16, 16), pixels=(((2, 8), RED), ((13, 8), BLUE)))),
    }
    for name, (data, _) in files.items():
        (dest / name).write_bytes(data)
    return {name: expect for name, (_, expect) in files.items()}


def _gif(frames: list[Image.Image]) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


# Prompt -> what it must become in the index: the cleaned text, None (no caption), or a failure reason.
LONG_PROMPT = ("a very detailed oil painting of a red fox in a snowy birch forest at dawn, " * 40)[:3000]
HOSTILE_PROMPTS: dict[str, tuple[object, Expect, str | None]] = {
    # id: (raw prompt, expectation, cleaned prompt in the index)
    "empty": ("", Expect("kept"), None),
    "blank": ("  \t \n ", Expect("kept"), None),
    "long": (LONG_PROMPT, Expect("kept"), LONG_PROMPT.strip()),
    "cjk": ("雪の森の赤い狐、油絵", Expect("kept"), "雪の森の赤い狐、油絵"),
    "emoji": ("🦊 in 🌲🌲 with family 👨‍👩‍👧", Expect("kept"), "🦊 in 🌲🌲 with family 👨‍👩‍👧"),
    "newlines": ("line one\nline two\r\nline three", Expect("kept"), "line one\nline two\nline three"),
    "control": ("a\x00b\x07c \x1b[31mred\x9b\x7f\tend\x85", Expect("kept"), "abc [31mred\tend"),
    "separator": ("before\u2028after", Expect("kept"), "before\u2028after"),
    "not-text": (["a", "list"], Expect("failed", "prompt is not text (list)"), None),
    "huge": ("x" * 30_000, Expect("failed", "prompt too long: 30000 characters"), None),
}


def hostile_content(dest: Path) -> tuple[Path, dict[str, Expect], dict[str, str | None]]:
    """The image corpus, one good image and a jsonl manifest over them: one row per corpus image (id = file
    name), a row for a missing file, and every hostile prompt as the caption of the good image (id =
    ``prompt-<name>``). Returns the manifest, id -> expectation, and id -> prompt expected in the index."""
    expect: dict[str, Expect] = dict(image_corpus(dest))
    (dest / "good.png").write_bytes(encoded(textured((48, 48), seed=3), "PNG"))
    rows = [{"id": name, "image": name, "prompt": "a test image"} for name in expect]
    prompts: dict[str, str | None] = dict.fromkeys(expect, "a test image")
    rows.append({"id": "missing.png", "image": "missing.png", "prompt": "gone"})
    expect["missing.png"], prompts["missing.png"] = Expect("failed", "content: not found"), "gone"
    for pid, (raw, exp, cleaned) in HOSTILE_PROMPTS.items():
        rows.append({"id": f"prompt-{pid}", "image": "good.png", "prompt": raw})
        expect[f"prompt-{pid}"], prompts[f"prompt-{pid}"] = exp, cleaned
    path = dest / "content.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path, expect, prompts


def prompt_only_manifest(dest: Path) -> tuple[Path, dict[str, Expect]]:
    """A jsonl prompt list (no images): empty prompts fail at the source; the rest reach the operator."""
    rows = {"p-empty": "", "p-blank": " \t ", "p-control": "\x00\x01\x1f", "p-fox": "a red fox",
            "p-long": LONG_PROMPT}
    expect = {"p-empty": Expect("failed", "content: empty prompt"),
              "p-blank": Expect("failed", "content: empty prompt"),
              "p-control": Expect("failed", "content: empty prompt"),
              "p-fox": Expect("failed", "operator: color-transfer needs a content image"),
              "p-long": Expect("failed", "operator: color-transfer needs a content image")}
    path = dest / "prompt-only.jsonl"
    path.write_text("\n".join(json.dumps({"id": k, "prompt": v}) for k, v in rows.items()) + "\n")
    return path, expect


def _add(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def hostile_tar(path: Path, escape_dir: Path) -> dict[str, Expect]:
    """A WebDataset tar with hostile member names and broken samples, cut short inside its last sample.

    ``escape_dir`` is where an absolute member name points (inside the test's tmp_path, so that a writer that
    followed it would be caught). Returns sample id (``<tar name>/<key>``) -> expectation.
    """
    good = [encoded(textured((40, 40), seed=i), "PNG") for i in range(4)]
    base = path.name
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "good0.png", good[0])
        _add(tar, "good0.txt", b"a good sample\x00 with a NUL")
        _add(tar, "../../climb.png", good[1])
        _add(tar, f"{escape_dir}/abs.png", good[1])
        _add(tar, "dots.in.key.png", good[1])  # WebDataset key "dots", extension "in.key.png"
        _add(tar, "noimage.txt", b"a caption without an image")
        _add(tar, "noimage.json", b'{"prompt": "still no image"}')
        _add(tar, "badjson.png", good[2])
        _add(tar, "badjson.json", b'{"prompt": "unterminated')
        _add(tar, "link.png", b"", tarfile.SYMTYPE, "/etc/passwd")
        _add(tar, "good1.jpg", encoded(textured((40, 40), seed=9), "JPEG"))
        _add(tar, "good1.json", json.dumps({"caption": "caption from json"}).encode())
        _add(tar, "cut.png", good[3])
    with tarfile.open(path) as tar:
        cut = tar.getmember("cut.png")
    data = path.read_bytes()
    path.write_bytes(data[: cut.offset_data + cut.size // 2])  # truncated inside the last image
    return {
        f"{base}/good0": Expect("kept"),
        f"{base}/../../climb": Expect("failed", "unsafe tar member name"),
        f"{base}/{escape_dir}/abs": Expect("failed", "unsafe tar member name"),
        f"{base}/dots": Expect("failed", "no image member (has: in.key.png)"),
        f"{base}/noimage": Expect("failed", "no image member (has: json, txt)"),
        f"{base}/badjson": Expect("kept"),
        f"{base}/link": Expect("failed", "is a link, not a file"),
        f"{base}/good1": Expect("kept"),
        f"{base}/cut": Expect("failed", "tar is truncated"),
    }
