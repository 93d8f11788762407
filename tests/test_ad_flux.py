"""FLUX Attention Distillation vs. the authors' golden outputs (shared/fixtures/ad-reference-flux).

Every case of the fixture is rerun under its protocol (fp32, one thread, deterministic algorithms, a CPU generator
seeded with the case seed) and compared with the stored tensors: ``latents``, ``image`` and ``grad0`` with
``torch.equal`` (the fixture README: no tolerance on latents, Adam's first step is about ``lr * sign(grad)``), the
loss values to atol 1e-8, and the step-by-step trace exactly, so a failure names the first diverging stage.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.shared_data import fixture_protocol, fixtures_dir

FIXTURES = fixtures_dir() / "ad-reference-flux"
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]

EXACT = ("latents", "image", "grad0")
LOSSES = ("loss0", "losses", "layer_losses")
TRACE = ("init_latents", "style_latent", "null_embeds", "null_pooled_embeds", "prompt_embeds",
         "pooled_prompt_embeds", "latent_image_ids", "style_image_ids", "timesteps", "sigmas", "euler_out",
         "style_noised", "ad_step_index", "ad_init", "ad_out", "x0")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with fixture_protocol():  # the fixtures' protocol
        yield


@pytest.fixture(scope="module")
def ad_flux():
    from operators.ad import flux as ad_flux

    return ad_flux


@pytest.fixture(scope="module")
def pipe(ad_flux):
    return ad_flux.load_flux_pipeline(str(FIXTURES / "model"))


def _image(rel: str) -> torch.Tensor:
    array = np.asarray(Image.open(FIXTURES / rel).convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


def _golden(case: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / case["file"]))


def _run(ad_flux, pipe, case: dict, **kwargs):
    return ad_flux.flux_ad_sample(
        pipe, _image(case["style_image"]), case["prompt"], height=case["height"], width=case["width"],
        steps=case["num_inference_steps"], lr=case["lr"], iters=case["iters"], layers=tuple(case["layers"]),
        guidance_scale=case["guidance_scale"], start_time=case["start_time"],
        max_sequence_length=case["max_sequence_length"], generator=torch.Generator().manual_seed(case["seed"]),
        **kwargs,
    )


def test_every_case_is_covered():
    assert sorted(CASES) == ["t2i_basic", "t2i_params"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_reproduces_golden(ad_flux, pipe, name):
    case = CASES[name]
    golden = _golden(case)
    assert torch.equal(_image(case["style_image"]), golden["style_image"])
    global_state = torch.get_rng_state()
    latents, image, trace = _run(ad_flux, pipe, case)
    assert torch.equal(torch.get_rng_state(), global_state), "a draw used the global generator"
    got = {**trace, "latents": latents, "image": image}
    for key in TRACE + EXACT:
        want = golden[key]
        have = got[key].to(want.dtype)
        assert have.shape == want.shape, key
        assert torch.equal(have, want), f"{key}: max |diff| {(have.double() - want.double()).abs().max().item()}"
    for key in LOSSES:
        torch.testing.assert_close(got[key], golden[key], atol=1e-8, rtol=0, msg=key)
    assert set(golden) - {"style_image"} <= set(got)


def test_processors_restored(ad_flux, pipe):
    """The tap is scoped to the call: afterwards the transformer has its own processors again."""
    before = {k: type(v) for k, v in pipe.transformer.attn_processors.items()}
    _run(ad_flux, pipe, CASES["t2i_params"])
    assert {k: type(v) for k, v in pipe.transformer.attn_processors.items()} == before
    assert not any(isinstance(v, ad_flux.FluxTapProcessor) for v in pipe.transformer.attn_processors.values())


def test_gradient_checkpointing_changes_no_bits(ad_flux, pipe):
    """The authors' notebook runs with gradient checkpointing on; it must not move a bit, and is undone after."""
    case = CASES["t2i_basic"]
    golden = _golden(case)
    latents, image, trace = _run(ad_flux, pipe, case, gradient_checkpointing=True)
    assert not pipe.transformer.gradient_checkpointing
    for key, have in (("latents", latents), ("image", image), ("grad0", trace["grad0"])):
        assert torch.equal(have, golden[key]), key
