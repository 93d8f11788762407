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
    assert (s["precision"], s["fast"], s["gradient_checkpointing"]) == ("fp32", False, False)  # CPU: reference
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


@pytest.mark.parametrize("param", ["negative_prompt", "attn_scale", "feature_chunk", "init_from_style"])
def test_flux_refuses_sd_only_params(tiny_flux_dir, param):
    from operators import build_operator, check_params

    value = {"negative_prompt": "x", "attn_scale": 1.0, "feature_chunk": 4, "init_from_style": True}
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
        check_params("ad-t2i", {"precision": "fp64"}, model="tiny:flux")
    with pytest.raises(ValueError, match="style_size"):  # FLUX only
        check_params("ad-t2i", {"style_size": 64}, model="tiny:sd15")
    from operators import build_operator

    with pytest.raises(ValueError, match="size"):  # 2x2-packed latents: multiples of 16 px
        build_operator({"name": "ad-t2i", "model": "tiny:flux", "params": {"size": 24}})


# --- the golden cases through the operator, and the fast mode ------------------------------------------------------

def _golden_case(name: str):
    from tests import golden

    return golden.FLUX, golden.FLUX_CASES[name]


@pytest.mark.parametrize("name", ["t2i_basic", "t2i_params"])
def test_golden_cases_through_the_operator(name):
    """Every FLUX fixture case through the config's path: ``build_operator`` loads the fixture's ``model/`` by the
    normal loading code, the style is read at ``style_size``, and the decoded image is the golden one (within the
    cross-CPU image bound of ``tests/golden.py``; bit for bit on the CPU that made the fixtures)."""
    from PIL import Image
    from safetensors.torch import load_file

    from operators import build_operator
    from operators.ad import tensor_to_pil
    from tests.data_paths import fixture_protocol

    root, case = _golden_case(name)
    params = {"steps": case["num_inference_steps"], "lr": case["lr"], "iters": case["iters"],
              "layers": case["layers"], "size": [case["width"], case["height"]],
              "style_size": case["style_size_wh"], "guidance_scale": case["guidance_scale"],
              "start_time": case["start_time"], "max_sequence_length": case["max_sequence_length"],
              "gradient_checkpointing": case["enable_gradient_checkpoint"]}
    with fixture_protocol():
        op = build_operator({"name": "ad-t2i", "model": str(root / "model"), "params": params})
        [res] = op([{"key": "g", "prompt": case["prompt"], "style": Image.open(root / case["style_image"]),
                     "content": None, "seed": case["seed"]}])
    from tests.golden import BOUNDS

    golden = np.asarray(tensor_to_pil(load_file(str(root / case["file"]))["image"])[0], dtype=np.int16)
    assert res["image"].size == (case["width"], case["height"])
    diff = np.abs(np.asarray(res["image"], dtype=np.int16) - golden)
    assert diff.mean() <= BOUNDS["flux.image"].mean and diff.max() <= BOUNDS["flux.image"].max


def _sample(pipe, style, **kwargs):
    from operators.ad.flux import flux_ad_sample

    return flux_ad_sample(pipe, style, "A panda", height=128, width=128, steps=4, lr=0.01, iters=2, layers=(2, 4),
                          guidance_scale=3.5, generator=torch.Generator().manual_seed(42), **kwargs)


def test_fast_mode_fp32_differs_from_the_reference_only_by_rounding():
    """Same draws, same method: one style gives the reference's result to rounding, two styles (one batched
    feature pass instead of one per style) too. The first loss is equal to rounding; after it the trajectory
    amplifies reassociation like another CPU would (measured on AMD EPYC with two styles: losses 9e-5, gradient
    7.5e-4, latents 2.3e-3 relative, image mean 0.12/255), so the cross-CPU bounds of ``tests/golden.py`` apply,
    which a wrong method fails (``test_ad_flux.test_bounds_fail_a_wrong_method``)."""
    from PIL import Image

    from operators.ad import pil_to_tensor
    from operators.ad.flux import load_flux_pipeline
    from tests import golden
    from tests.data_paths import fixture_protocol

    root, case = _golden_case("t2i_basic")
    style = pil_to_tensor(Image.open(root / case["style_image"]))
    with fixture_protocol():
        pipe = load_flux_pipeline(str(root / "model"))
        for styles in (style, torch.cat([style, style.flip(3)])):
            ref_latents, ref_image, ref_trace = _sample(pipe, styles)
            latents, image, trace = _sample(pipe, styles, fast=True)
            assert golden.rel_error(trace["loss0"], ref_trace["loss0"]) <= golden.BOUNDS["flux.loss0"].rel
            assert golden.rel_error(trace["losses"], ref_trace["losses"]) <= golden.BOUNDS["flux.losses"].rel
            assert golden.rel_error(latents, ref_latents) <= golden.BOUNDS["flux.t2i_basic.latents"].rel
            diff = np.abs(golden.pixels(image) - golden.pixels(ref_image))
            assert diff.mean() <= golden.BOUNDS["flux.image"].mean and diff.max() <= golden.BOUNDS["flux.image"].max


def test_bf16_fast_mode_with_checkpointing():
    """The fast mode's own precision: bf16 transformer and text encoders, fp32 VAE, latents and losses; gradient
    checkpointing on by default and undone afterwards; the result stays near the fp32 reference."""
    from PIL import Image

    from operators import build_operator

    root, case = _golden_case("t2i_basic")
    item = {"key": "b", "prompt": case["prompt"], "style": Image.open(root / case["style_image"]), "content": None,
            "seed": case["seed"]}
    params = {"steps": 4, "iters": 2, "layers": [2, 4], "size": 128}
    ref = build_operator({"name": "ad-t2i", "model": str(root / "model"), "params": params})
    fast = build_operator({"name": "ad-t2i", "model": str(root / "model"), "params": {**params,
                                                                                       "precision": "bf16"}})
    assert fast.settings["fast"] and fast.settings["gradient_checkpointing"]
    assert fast.pipe.transformer.dtype == torch.bfloat16 and fast.pipe.text_encoder_2.dtype == torch.bfloat16
    assert fast.pipe.vae.dtype == torch.float32
    [a], [b] = ref([item]), fast([item])
    assert not fast.pipe.transformer.gradient_checkpointing
    assert np.isfinite(b["meta"]["final_ad_loss"])
    assert b["meta"]["final_ad_loss"] == pytest.approx(a["meta"]["final_ad_loss"], rel=0.15)
    diff = np.abs(np.asarray(a["image"], dtype=np.int16) - np.asarray(b["image"], dtype=np.int16))
    assert diff.mean() < 16  # bf16 noise, not a different image
