"""``tiny:flux`` and the ``ad-t2i`` operator on FLUX (``operators.ad_flux`` through ``ADText2Image``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory):
    from operators.models import save_tiny

    return save_tiny("flux", tmp_path_factory.mktemp("tiny-flux"))


def test_tiny_flux_loads_and_samples(tiny_flux_dir):
    from operators.ad_flux import flux_ad_sample, load_flux_pipeline

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
