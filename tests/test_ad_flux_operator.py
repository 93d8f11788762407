"""``tiny:flux`` and the ``ad-t2i`` operator on FLUX (``operators.ad.flux`` through ``ADText2Image``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    from operators.models import save_tiny

    return save_tiny("flux", tmp_path_factory.mktemp("tiny-flux"))


def test_tiny_flux_loads_and_samples(tiny_flux_dir):
    from operators.ad.flux import flux_ad_sample, load_flux_pipeline

    assert (tiny_flux_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = load_flux_pipeline(str(tiny_flux_dir))
    assert type(pipe).__name__ == "FluxPipeline"
    style = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    latents, image, trace = flux_ad_sample(pipe, style, "a cat", height=32, width=32, steps=2, lr=0.01, iters=1,
                                           layers=(0, 3), guidance_scale=3.5, max_sequence_length=16,
                                           generator=torch.Generator().manual_seed(0))
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    assert latents.shape == (1, 4, 16)  # 2x2 tokens of 4 x 4 latent channels
    assert trace["losses"].shape == (2, 1) and torch.isfinite(trace["losses"]).all()


def _style(seed: int, size: int = 32):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


SMALL = {"steps": 2, "iters": 1, "size": 32, "max_sequence_length": 16}


@pytest.fixture(scope="module")
def flux_op(tiny_flux_dir):
    from operators import build_operator

    return build_operator({"name": "ad-t2i", "model": str(tiny_flux_dir), "params": SMALL})


def test_flux_operator_defaults_and_bit_identity(flux_op, tiny_flux_dir):
    from operators.ad import pil_to_tensor, tensor_to_pil
    from operators.ad.flux import flux_ad_sample

    s = flux_op.settings
    assert flux_op.flux and s["layers"] == (0, 3)  # tiny: 1 double + 2 single blocks, last min(7, 3) calls
    assert (s["lr"], s["guidance_scale"], s["start_time"], s["adain"]) == (0.01, 3.5, 9999, True)
    style = _style(3)
    [res] = flux_op([{"key": "k0", "prompt": "a red house", "style": style, "content": None, "seed": 11}])
    assert set(res) == {"key", "image", "meta"} and res["key"] == "k0" and res["image"].size == (32, 32)
    assert res["meta"]["family"] == "flux" and res["meta"]["seed"] == 11
    _, image, _ = flux_ad_sample(flux_op.pipe, pil_to_tensor(style, (32, 32)), "a red house", height=32, width=32,
                                 steps=2, lr=0.01, iters=1, layers=(0, 3), guidance_scale=3.5, start_time=9999,
                                 max_sequence_length=16, generator=torch.Generator().manual_seed(11))
    assert np.array_equal(np.asarray(res["image"]), np.asarray(tensor_to_pil(image)[0]))


def test_flux_adain_off_num_images_and_several_styles(flux_op, tiny_flux_dir):
    from operators import build_operator

    item = {"key": "k", "prompt": "a tree", "style": _style(1), "content": None, "seed": 5}
    [base] = flux_op([item])
    off = build_operator({"name": "ad-t2i", "model": str(tiny_flux_dir), "params": {**SMALL, "adain": False}})
    [no_adain] = off([item])
    assert not np.array_equal(np.asarray(base["image"]), np.asarray(no_adain["image"]))
    multi = build_operator({"name": "ad-t2i", "model": str(tiny_flux_dir), "params": {**SMALL, "num_images": 2}})
    [two] = multi([item])
    assert len(two["images"]) == 2
    assert np.array_equal(np.asarray(two["images"][0]), np.asarray(base["image"]))  # image 0 = num_images 1
    assert not np.array_equal(np.asarray(two["images"][0]), np.asarray(two["images"][1]))
    [styled] = flux_op([{**item, "style": [_style(1), _style(2)]}])
    assert styled["meta"]["num_styles"] == 2 and styled["image"].size == (32, 32)
    assert not np.array_equal(np.asarray(styled["image"]), np.asarray(base["image"]))


@pytest.mark.parametrize("param", ["negative_prompt", "attn_scale", "feature_chunk", "fast", "init_from_style"])
def test_flux_refuses_sd_only_params(tiny_flux_dir, param):
    from operators import build_operator, check_params

    value = {"negative_prompt": "x", "attn_scale": 1.0, "feature_chunk": 4, "fast": True, "init_from_style": True}
    params = {**SMALL, param: value[param]}
    with pytest.raises(ValueError, match=param):
        check_params("ad-t2i", params, model="tiny:flux")  # config time, model known offline
    with pytest.raises(ValueError, match=param):
        check_params("ad-t2i", params, model=str(tiny_flux_dir))
    with pytest.raises(ValueError, match=param):
        build_operator({"name": "ad-t2i", "model": str(tiny_flux_dir), "params": params})


def test_flux_params_on_sd_and_unknown_models():
    from operators import check_params

    check_params("ad-t2i", {"max_sequence_length": 64}, model="org/some-model")  # hub id: checked when built
    with pytest.raises(ValueError, match="max_sequence_length"):
        check_params("ad-t2i", {"max_sequence_length": 64}, model="tiny:sd15")
    with pytest.raises(ValueError, match="precision"):
        check_params("ad-t2i", {"precision": "bf16"}, model="tiny:flux")
    from operators import build_operator

    with pytest.raises(ValueError, match="size"):  # 2x2-packed latents: multiples of 16 px
        build_operator({"name": "ad-t2i", "model": "tiny:flux", "params": {"size": 24}})
