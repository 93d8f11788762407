"""pipeline.io.images: hostile-input-safe decoding to 8-bit RGB, and deterministic encoding."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import webdataset as wds
from PIL import Image

from pipeline.generate.stages import decode_batch
from pipeline.io.images import DecodeError, decode_image, encode_image, to_rgb
from pipeline.io.sources import ImageRef, SourceItem, read_images
from pipeline.plan.keys import pair
from pipeline.schema import ROW_SCHEMA
from tests.unit_helpers import SAMPLES, bilevel_png, jpeg_bytes, png_bytes

BIG = 64_000_000  # the config default for decode.max_pixels

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def close(pixel, expected, tol=40) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected, strict=True))


def test_exif_orientation_6_is_applied():
    # Stored 40 wide x 20 tall: left half red, right half blue. Orientation 6 means "rotate 90 degrees
    # clockwise to display", which moves the left edge to the top: displayed 20 wide x 40 tall, red on top.
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = jpeg_bytes(stored, quality=95, exif=exif)

    im = decode_image(data, max_pixels=BIG)
    assert im.mode == "RGB"
    assert im.size == (20, 40)
    assert close(im.getpixel((10, 8)), RED)
    assert close(im.getpixel((10, 31)), BLUE)


def test_exif_orientation_3_rotates_180():
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 3
    im = decode_image(jpeg_bytes(stored, quality=95, exif=exif), max_pixels=BIG)
    assert im.size == (40, 20)
    assert close(im.getpixel((31, 10)), RED)  # red is now on the right
    assert close(im.getpixel((8, 10)), BLUE)


def test_rgba_is_composited_over_white():
    im = Image.new("RGBA", (3, 1))
    im.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    im.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue stays blue
    im.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black over white -> mid grey
    out = decode_image(png_bytes(im), max_pixels=BIG)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == BLUE
    expected = 255 * (1 - 128 / 255)  # = 127
    assert all(abs(v - expected) <= 1 for v in out.getpixel((2, 0)))


def test_la_is_composited_over_white():
    im = Image.new("LA", (2, 1))
    im.putpixel((0, 0), (0, 0))
    im.putpixel((1, 0), (10, 255))
    out = decode_image(png_bytes(im), max_pixels=BIG)
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == (10, 10, 10)


def test_palette_with_transparency():
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))  # index 0 red, index 1 green
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    buf = io.BytesIO()
    im.save(buf, format="PNG", transparency=0)  # index 0 is transparent
    out = decode_image(buf.getvalue(), max_pixels=BIG)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == WHITE  # the transparent red shows the background
    assert out.getpixel((1, 0)) == GREEN


def _gray16(values: list[int], fmt: str) -> bytes:
    im = Image.new("I;16", (len(values), 1))
    im.frombytes(np.asarray(values, dtype="<u2").tobytes())
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_is_scaled_to_8_bit(fmt):
    values = [0, 257 * 100, 65535, 32768, 255, 100]
    out = decode_image(_gray16(values, fmt), max_pixels=BIG)
    assert out.mode == "RGB"
    got = [out.getpixel((i, 0)) for i in range(len(values))]
    for value, pixel in zip(values, got, strict=True):
        expected = value * 255 / 65535  # full-scale 16-bit -> full-scale 8-bit
        assert pixel[0] == pixel[1] == pixel[2]
        assert abs(pixel[0] - expected) <= 0.51, (value, pixel)


def test_dark_16_bit_image_stays_dark():
    # All values <= 255 out of 65535: a nearly black image must not be stretched to white.
    out = decode_image(_gray16([0, 128, 255], "PNG"), max_pixels=BIG)
    assert max(out.getpixel((i, 0))[0] for i in range(3)) <= 1


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk_to_rgb(fmt):
    im = Image.new("CMYK", (24, 8))
    im.paste((0, 0, 0, 0), (0, 0, 8, 8))  # no ink: white
    im.paste((0, 255, 255, 0), (8, 0, 16, 8))  # magenta + yellow: red
    im.paste((0, 0, 0, 255), (16, 0, 24, 8))  # black ink: black
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    out = decode_image(buf.getvalue(), max_pixels=BIG)
    assert out.mode == "RGB"
    tol = 0 if fmt == "TIFF" else 12
    assert close(out.getpixel((4, 4)), WHITE, tol)
    assert close(out.getpixel((12, 4)), RED, tol)
    assert close(out.getpixel((20, 4)), (0, 0, 0), tol)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(io.BytesIO(buf.getvalue())) as check:
        assert getattr(check, "n_frames", 1) == 3  # really animated
    out = decode_image(buf.getvalue(), max_pixels=BIG)
    assert out.size == (16, 16)
    assert close(out.getpixel((8, 8)), RED, 8)


@pytest.mark.parametrize(("size", "max_side"), [((400, 200), 100), ((200, 400), 100), ((1000, 250), 64)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_max_side_resize_keeps_aspect_ratio(size, max_side, fmt):
    im = Image.new("RGB", size, (30, 60, 90))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    out = decode_image(buf.getvalue(), max_pixels=BIG, max_side=max_side)
    long_side, short_side = max(size), min(size)
    expected_short = short_side * max_side / long_side  # the short side shrinks by the same factor
    assert max(out.size) == max_side
    assert abs(min(out.size) - expected_short) <= 1
    assert (out.size[0] > out.size[1]) == (size[0] > size[1])  # orientation kept
    assert decode_image(buf.getvalue(), max_pixels=BIG, max_side=5000).size == size  # never upscaled


def test_real_sample_decodes_with_aspect_ratio():
    data = (SAMPLES / "content" / "deer.jpg").read_bytes()
    with Image.open(io.BytesIO(data)) as raw:
        w, h = raw.size
    out = decode_image(data, max_pixels=BIG, max_side=128)
    assert max(out.size) == 128 and out.mode == "RGB"
    assert abs(out.size[0] / out.size[1] - w / h) < 0.05


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty"),
        (None, "empty"),
        (np.random.default_rng(1).bytes(4096), "not an image"),
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "HTML"),
        (b"  <html><head></head></html>", "HTML"),
    ],
)
def test_non_images_raise_decode_error(data, needle):
    with pytest.raises(DecodeError) as info:
        decode_image(data, max_pixels=BIG)
    assert needle in str(info.value)


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_jpeg_raises_decode_error(fraction):
    data = (SAMPLES / "content" / "deer.jpg").read_bytes()
    with pytest.raises(DecodeError) as info:
        decode_image(data[: int(len(data) * fraction)], max_pixels=BIG)
    assert "truncated" in str(info.value).lower()


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # The IDAT is garbage: any attempt to decode pixels would fail with a different message.
    data = bilevel_png(2000, 1500, with_data=False)
    with pytest.raises(DecodeError) as info:
        decode_image(data, max_pixels=1_000_000)
    message = str(info.value)
    assert "2000x1500" in message
    assert "1000000" in message


def test_huge_bilevel_png_is_rejected_without_decoding():
    data = bilevel_png(20000, 20000, with_data=False)
    assert len(data) < 200  # tiny on disk
    with pytest.raises(DecodeError) as info:
        decode_image(data, max_pixels=BIG)
    message = str(info.value)
    assert "20000x20000" in message or str(20000 * 20000) in message


def test_image_at_the_pixel_limit_decodes():
    data = bilevel_png(100, 50)
    out = decode_image(data, max_pixels=100 * 50)
    assert out.size == (100, 50) and out.getpixel((5, 5)) == (0, 0, 0)
    with pytest.raises(DecodeError):
        decode_image(data, max_pixels=100 * 50 - 1)


def test_configured_max_pixels_above_pillow_default_is_honoured():
    data = bilevel_png(9500, 9500)  # 90.25M pixels: under max_pixels=100M, over Pillow's default limit
    out = decode_image(data, max_pixels=100_000_000, max_side=256)
    assert out.size == (256, 256)


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_encode_image_is_deterministic(fmt):
    im = Image.open(SAMPLES / "style" / "1.png").convert("RGB")
    im.thumbnail((96, 96))
    first, second = encode_image(im, fmt), encode_image(im.copy(), fmt)
    assert first == second
    back = Image.open(io.BytesIO(first))
    assert back.size == im.size


def test_encode_png_is_lossless_and_jpeg_quality_matters():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(im, "png")))), np.asarray(im))
    assert len(encode_image(im, "jpeg", quality=30)) < len(encode_image(im, "jpeg", quality=95))
    with pytest.raises(ValueError):
        encode_image(im, "bmp")


def test_to_rgb_passes_rgb_through():
    im = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(im).getpixel((0, 0)) == (1, 2, 3)
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((1, 1)) == (7, 7, 7)


# ---- pipeline.generate.stages.decode_batch: decoding inside the data path -------------------------------------------


def _plan_table(tmp_path):
    good = SAMPLES / "style" / "2.jpg"
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg at all")
    contents = [SourceItem(id="c", prompt="a deer")]
    styles = [SourceItem(id="good", image=ImageRef(str(good))), SourceItem(id="bad", image=ImageRef(str(bad)))]
    plan = pair(contents, styles, styles_per_content=2, seeds_per_pair=1, seed=0, operator_hash="x" * 16)
    return pa.Table.from_pylist([p.to_row() for p in plan], schema=ROW_SCHEMA), good


def test_decode_batch_fails_only_the_row_with_the_bad_style(tmp_path):
    table, good = _plan_table(tmp_path)
    out = decode_batch(table, {"max_side": 64, "max_pixels": BIG})
    assert out.schema.equals(ROW_SCHEMA)
    rows = {r["style_id"]: r for r in out.to_pylist()}
    assert set(rows) == {"good", "bad"}

    bad = rows["bad"]
    assert bad["status"] == "failed"
    assert bad["reason"].startswith("style:")
    assert "not an image" in bad["reason"]
    assert bad["image"] is None

    ok = rows["good"]
    assert not ok["status"] and not ok["reason"]
    assert ok["content_bytes"] is None  # prompt-only content: nothing to fetch
    im = Image.open(io.BytesIO(ok["style_bytes"]))
    with Image.open(good) as src:
        w, h = src.size
    assert im.mode == "RGB" and max(im.size) == 64
    assert abs(im.size[0] / im.size[1] - w / h) < 0.05


def test_decode_batch_missing_content_and_listed_errors(tmp_path):
    base = {name: None for name in ROW_SCHEMA.names}
    style = str(SAMPLES / "style" / "1.png")
    rows = [
        dict(base, key="a", content_url=str(tmp_path / "gone.jpg"), content_offset=0, content_size=-1,
             style_url=style, style_offset=0, style_size=-1),
        dict(base, key="b", style_url="", style_offset=0, style_size=-1, error="style: tar sample has no image"),
        dict(base, key="c", content_url=str(SAMPLES / "content" / "deer.jpg"), content_offset=0, content_size=-1,
             style_url=style, style_offset=0, style_size=-1),
    ]
    out = {r["key"]: r for r in decode_batch(pa.Table.from_pylist(rows, schema=ROW_SCHEMA),
                                             {"max_side": 32}).to_pylist()}
    assert out["a"]["status"] == "failed" and out["a"]["reason"].startswith("content:")
    assert "gone.jpg" in out["a"]["reason"]
    assert out["b"]["status"] == "failed" and out["b"]["reason"] == "style: tar sample has no image"
    assert not out["c"]["status"]
    assert max(Image.open(io.BytesIO(out["c"]["content_bytes"])).size) == 32
    assert max(Image.open(io.BytesIO(out["c"]["style_bytes"])).size) == 32


def test_decode_batch_reads_a_tar_member_by_offset(tmp_path):
    src = SAMPLES / "style" / "3.jpg"
    with wds.TarWriter(str(tmp_path / "s.tar"), encoder=False) as tw:
        tw.write({"__key__": "pad", "txt": b"x" * 3000})
        tw.write({"__key__": "img", "jpg": src.read_bytes()})
    ref = {i.id: i for i in read_images(str(tmp_path / "s.tar"), "style.images")}["s.tar/img"].image
    row = {name: None for name in ROW_SCHEMA.names}
    row.update(key="k", style_url=ref.url, style_offset=ref.offset, style_size=ref.size)
    (out,) = decode_batch(pa.Table.from_pylist([row], schema=ROW_SCHEMA), {"max_side": 48}).to_pylist()
    assert not out["status"], out["reason"]
    expected = decode_image(src.read_bytes(), max_pixels=BIG, max_side=48)
    got = Image.open(io.BytesIO(out["style_bytes"])).convert("RGB")
    assert got.size == expected.size
    assert np.array_equal(np.asarray(got), np.asarray(expected))
