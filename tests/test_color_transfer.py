"""operators.color_transfer: Reinhard statistics transfer in CIELAB, and its operator wrapper.

Lab values are computed here with numpy from the CIE formulas (sRGB -> XYZ(D50) -> L*a*b*), independently
of the lcms transforms the module uses, so a wrong encoding of Lab in the module cannot hide itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from operators import build_operator
from operators.color_transfer import ColorTransfer, transfer_statistics
from tests.unit_helpers import SAMPLES, lab_pixels


def load(rel: str, side: int = 128) -> Image.Image:
    im = Image.open(SAMPLES / rel).convert("RGB")
    im.thumbnail((side, side))
    return im


@pytest.fixture(scope="module")
def pair_images() -> tuple[Image.Image, Image.Image]:
    # A green/yellow photo (negative a*, strongly positive b*) and a nearly neutral style image:
    # both have in-gamut statistics, so the transfer can match them closely.
    return load("content/deer.jpg"), load("style/2.jpg")


def test_independent_lab_reference_is_sane():
    grey = lab_pixels(Image.new("RGB", (1, 1), (128, 128, 128)))[0]
    assert abs(grey[1]) < 1e-6 and abs(grey[2]) < 1e-6 and 53 < grey[0] < 54
    green = lab_pixels(Image.new("RGB", (1, 1), (0, 255, 0)))[0]
    assert green[1] < -70 and green[2] > 70


def test_inputs_differ_enough_for_the_test_to_mean_something(pair_images):
    content, style = pair_images
    diff = np.abs(lab_pixels(content).mean(0) - lab_pixels(style).mean(0))
    assert diff[1] > 10 and diff[2] > 10


def test_output_lab_means_match_the_style(pair_images):
    content, style = pair_images
    out = transfer_statistics(content, style, strength=1.0)
    assert out.size == content.size and out.mode == "RGB"
    out_lab, style_lab = lab_pixels(out), lab_pixels(style)
    np.testing.assert_allclose(out_lab.mean(0), style_lab.mean(0), atol=1.5)
    np.testing.assert_allclose(out_lab.std(0), style_lab.std(0), atol=1.5)


def test_output_lightness_matches_the_style(pair_images):
    content, style = pair_images
    out = transfer_statistics(content, style, strength=1.0)
    out_l, style_l, content_l = lab_pixels(out)[:, 0], lab_pixels(style)[:, 0], lab_pixels(content)[:, 0]
    assert abs(out_l.mean() - style_l.mean()) < 1.5
    assert abs(out_l.std() - style_l.std()) < 1.5
    assert abs(content_l.std() - style_l.std()) > 5  # the lightness spread really had to change


def test_structure_of_the_content_is_kept(pair_images):
    content, style = pair_images
    out = transfer_statistics(content, style, strength=1.0)
    c_l = lab_pixels(content)[:, 0]
    o_l = lab_pixels(out)[:, 0]
    assert np.corrcoef(c_l, o_l)[0, 1] > 0.95  # a per-channel affine map keeps the picture


def test_strength_zero_returns_the_content(pair_images):
    content, style = pair_images
    out = transfer_statistics(content, style, strength=0.0)
    diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(content, dtype=np.int16))
    assert diff.mean() < 2.0  # only the Lab round trip's rounding
    assert np.percentile(diff, 99) <= 6


def test_strength_interpolates(pair_images):
    content, style = pair_images
    style_spread = lab_pixels(style)[:, 0].std()
    gaps = [abs(lab_pixels(transfer_statistics(content, style, s))[:, 0].std() - style_spread)
            for s in (0.0, 0.5, 1.0)]
    assert gaps[0] > 5 and gaps[0] > gaps[1] and gaps[0] > gaps[2]
    assert gaps[2] < 1.5


def test_half_strength_is_halfway(pair_images):
    content, style = pair_images
    spreads = [lab_pixels(transfer_statistics(content, style, s))[:, 0].std() for s in (0.0, 0.5, 1.0)]
    # L_out = L_c + t * (affine(L_c) - L_c) is affine in L_c, so its spread moves linearly with t.
    assert spreads[1] == pytest.approx((spreads[0] + spreads[2]) / 2, abs=1.0)


def test_operator_wrapper_contract(pair_images):
    content, style = pair_images
    op = build_operator({"name": "color-transfer", "params": {"strength": 0.7}}, device="cpu")
    items = [
        {"key": "k1", "prompt": "x", "style": style, "content": content, "seed": 0},
        {"key": "k2", "prompt": "y", "style": [style], "content": None, "seed": 1},
        {"key": "k3", "prompt": None, "style": [style, content], "content": content, "seed": 2},
    ]
    results = op(items)
    assert [r["key"] for r in results] == ["k1", "k2", "k3"]
    assert isinstance(results[0]["image"], Image.Image) and results[0]["image"].size == content.size
    assert results[0]["meta"]["strength"] == pytest.approx(0.7)
    assert "error" in results[1] and "content" in results[1]["error"] and "image" not in results[1]
    expected = transfer_statistics(content, style, 0.7)
    assert np.array_equal(np.asarray(results[2]["image"]), np.asarray(expected))  # first style of a list


def test_operator_is_deterministic(pair_images):
    content, style = pair_images
    op = ColorTransfer(params={"strength": 1.0})
    item = {"key": "k", "prompt": None, "style": style, "content": content, "seed": 0}
    a, b = op([item])[0]["image"], op([dict(item)])[0]["image"]
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("params", [{"strenght": 0.5}, {"strength": 0.5, "mode": "lab"}])
def test_unknown_params_raise(params):
    with pytest.raises(ValueError, match="unknown param"):
        ColorTransfer(params=params)


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_strength_out_of_range_raises(strength):
    with pytest.raises(ValueError, match="strength"):
        ColorTransfer(params={"strength": strength})
