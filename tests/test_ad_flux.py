"""FLUX Attention Distillation vs. the authors' golden outputs (tests/data/fixtures/ad-reference-flux).

Every case of the fixture is rerun under its protocol (fp32, one thread, deterministic algorithms, a CPU generator
seeded with the case seed) and every stored tensor is compared within the cross-CPU bounds of ``tests/golden.py``:
the inputs (draws, text embeddings, VAE) and the first AD iteration's loss and gradient tightly, the step-by-step
trace, the losses and the result by each case's bound, the image by pixels, the integer ids exactly. On the CPU
that made the fixtures this reproduces them bit for bit; elsewhere the first AD steps amplify rounding (Adam's
first step is about ``lr * sign(grad)``), which is what the bounds allow for and no more
(``test_bounds_fail_a_wrong_method``). Exact equality is kept for comparisons inside this process.
"""

from __future__ import annotations

import pytest
import torch

from tests import golden as g
from tests.data_paths import fixture_protocol

CASES = g.FLUX_CASES


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
    return ad_flux.load_flux_pipeline(str(g.FLUX / "model"))


def test_every_case_is_covered():
    assert sorted(CASES) == ["t2i_basic", "t2i_params"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_reproduces_golden(ad_flux, pipe, name):
    case = CASES[name]
    want = g.golden(g.FLUX, case)
    assert torch.equal(g.image(g.FLUX, case["style_image"]), want["style_image"])
    global_state = torch.get_rng_state()
    latents, image, trace = g.flux_run(ad_flux, pipe, case)
    assert torch.equal(torch.get_rng_state(), global_state), "a draw used the global generator"
    assert g.check_flux(name, latents, image, trace, want) == []


def test_bounds_fail_a_wrong_method(ad_flux, pipe, monkeypatch):
    """The bounds still catch a wrong method: the AD layers shifted by one, or L2 in place of L1."""
    case = CASES["t2i_params"]
    want = g.golden(g.FLUX, case)
    shifted = {**case, "layers": [a + 1 for a in case["layers"]]}
    failures = g.check_flux("t2i_params", *g.flux_run(ad_flux, pipe, shifted), want)
    assert {"loss0", "grad0", "latents", "image"} <= {f.split(":")[0] for f in failures}
    monkeypatch.setattr(ad_flux, "ad_loss", g.l2_instead_of_l1(ad_flux.ad_loss))
    failures = g.check_flux("t2i_params", *g.flux_run(ad_flux, pipe, case), want)
    assert {"loss0", "grad0", "latents"} <= {f.split(":")[0] for f in failures}


def test_processors_restored(ad_flux, pipe):
    """The tap is scoped to the call: afterwards the transformer has its own processors again."""
    before = {k: type(v) for k, v in pipe.transformer.attn_processors.items()}
    g.flux_run(ad_flux, pipe, CASES["t2i_params"])
    assert {k: type(v) for k, v in pipe.transformer.attn_processors.items()} == before
    assert not any(isinstance(v, ad_flux.FluxTapProcessor) for v in pipe.transformer.attn_processors.values())


def test_gradient_checkpointing_changes_no_bits(ad_flux, pipe):
    """The authors' notebook runs with gradient checkpointing on; it must not move a bit (against our own run
    without it, in this process), and is undone after."""
    case = CASES["t2i_basic"]
    plain = g.flux_run(ad_flux, pipe, case)
    latents, image, trace = g.flux_run(ad_flux, pipe, case, gradient_checkpointing=True)
    assert not pipe.transformer.gradient_checkpointing
    for key, have, want in (("latents", latents, plain[0]), ("image", image, plain[1]),
                            ("grad0", trace["grad0"], plain[2]["grad0"])):
        assert torch.equal(have, want), key
