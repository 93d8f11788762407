"""Mask-controlled texture synthesis (``source_mask``/``target_mask`` of ``ad-texture`` optimize)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data_paths import fixtures_dir

FIXTURES = fixtures_dir() / "ad-reference"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _labels(rows: list[list[int]], size: tuple[int, int]) -> torch.Tensor:
    """A grey-scale label map: the coarse grid of labels ``rows``, nearest-scaled to ``size`` = (width, height)."""
    coarse = Image.fromarray(np.asarray(rows, dtype=np.uint8))
    return torch.from_numpy(np.asarray(coarse.resize(size, Image.NEAREST), dtype=np.float32).copy())


def test_layer_mask_is_label_equality_on_each_token_grid():
    from operators.ad.masks import LabelMasks, token_grid

    assert token_grid((8, 16), 128) == (8, 16) and token_grid((8, 16), 32) == (4, 8)
    with pytest.raises(ValueError, match="tokens"):
        token_grid((8, 16), 100)
    target = _labels([[1, 2]], (16, 8))  # left half label 1, right half label 2
    source = _labels([[2], [1]], (8, 8))  # top half label 2, bottom half label 1
    masks = LabelMasks(target, source)
    mask = masks.layer_mask((8, 16), (8, 8), 32, 16, styles=2, device=torch.device("cpu"))
    assert mask.shape == (32, 32) and mask.dtype == torch.bool
    t = torch.tensor([1, 1, 1, 1, 2, 2, 2, 2] * 4)  # the 4x8 target grid, row-major
    s = torch.tensor([2] * 8 + [1] * 8)  # the 4x4 source grid
    assert torch.equal(mask, (t[:, None] == s.repeat(2)[None, :]))


def test_a_label_lost_at_a_coarse_layer_attends_everything_and_unknown_labels_are_refused():
    from operators.ad.masks import LabelMasks

    target = _labels([[1, 1, 1, 3]], (16, 16))
    source = _labels([[1, 1, 1, 3]], (16, 16))
    # On a 2x2 grid the nearest resize keeps only label 1 in the source: label-3 queries keep every key.
    mask = LabelMasks(target, source).layer_mask((16, 16), (16, 16), 16, 4, 1, torch.device("cpu"))
    assert mask.any(dim=1).all()
    with pytest.raises(ValueError, match="absent from source_mask"):
        LabelMasks(_labels([[1, 4]], (8, 8)), _labels([[1, 2]], (8, 8)))


def test_masked_loss_equals_the_loss_against_the_allowed_style_tokens_only():
    """With every query allowed the same key subset, the masked AD loss is the loss against that subset of K/V,
    in both the reference and the fast form."""
    from operators.ad import ad_loss, ad_loss_fast, concat_style_kv
    from operators.attention import LayerFeatures

    g = torch.Generator().manual_seed(0)
    q, out = torch.randn(2, 2, 16, 8, generator=g), torch.randn(2, 2, 16, 8, generator=g)
    ks, vs = torch.randn(1, 2, 16, 8, generator=g), torch.randn(1, 2, 16, 8, generator=g)
    keep = torch.zeros(16, dtype=torch.bool)
    keep[:6] = True
    mask = keep[None, :].expand(16, 16)
    masked = ad_loss([q], [ks], [vs], [out], attn_masks=[mask])
    subset = ad_loss([q], [ks[:, :, keep]], [vs[:, :, keep]], [out])
    torch.testing.assert_close(masked, subset, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(masked, ad_loss([q], [ks], [vs], [out]))
    feats = [LayerFeatures(index=0, q=q, k=q, v=q, out=out)]
    fast = ad_loss_fast(feats, [concat_style_kv(ks, vs)], attn_masks=[mask])
    torch.testing.assert_close(fast, masked, rtol=1e-6, atol=1e-7)


def _write_mask(path, rows, size=(64, 64)) -> str:
    Image.fromarray(np.asarray(rows, dtype=np.uint8)).resize(size, Image.NEAREST).save(path)
    return str(path)


def test_texture_operator_with_masks(tmp_path):
    """Through the operator: a uniform pair of masks changes nothing; a split pair changes the texture, in both
    modes, and the fast mode stays close to the reference."""
    from operators import build_operator

    style = Image.open(FIXTURES / "inputs" / "style.png")
    item = {"key": "k", "prompt": None, "style": style, "content": None, "seed": 3}
    uniform = _write_mask(tmp_path / "one.png", [[7]])
    source = _write_mask(tmp_path / "source.png", [[1, 2]])  # style: left half 1, right half 2
    target = _write_mask(tmp_path / "target.png", [[2], [1]])  # output: top takes the right, bottom the left

    def run(**params):
        op = build_operator({"name": "ad-texture", "model": str(FIXTURES / "model"),
                             "params": {"steps": 3, "precision": "fp32", **params}})
        return op([item])[0]

    plain = run()
    same = run(source_mask=uniform, target_mask=uniform)
    split = run(source_mask=source, target_mask=target)
    as_array = lambda r: np.asarray(r["image"], dtype=np.int16)  # noqa: E731
    assert np.abs(as_array(same) - as_array(plain)).max() <= 1
    assert np.abs(as_array(split) - as_array(plain)).max() > 8
    assert split["meta"]["source_mask"] == source and np.isfinite(split["meta"]["final_ad_loss"])
    fast = run(source_mask=source, target_mask=target, fast=True)
    assert fast["meta"]["final_ad_loss"] == pytest.approx(split["meta"]["final_ad_loss"], rel=1e-3)


@pytest.mark.parametrize("params, message", [
    ({"source_mask": "a.png"}, "go together"),
    ({"method": "sample", "source_mask": "a.png", "target_mask": "b.png"}, "does not apply"),
])
def test_mask_params_are_checked_before_loading(params, message):
    from operators import check_params

    with pytest.raises(ValueError, match=message):
        check_params("ad-texture", params)
    with pytest.raises(ValueError, match="does not apply|unknown"):
        check_params("ad-transfer", {"source_mask": "a.png", "target_mask": "b.png"})
