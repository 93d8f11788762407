"""AD operators on tiny offline models: contract (sizes, errors, lists, batches), determinism, fast mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data_paths import fixtures_dir

FIXTURES = fixtures_dir() / "ad-reference"


@pytest.fixture(scope="module", autouse=True)
def env(tmp_path_factory):
    """One thread (fast and reproducible on CI) and a private tiny-model cache (never a stale shared one)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("STYLEGEN_CACHE", str(tmp_path_factory.mktemp("stylegen-cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


def _picture(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.BICUBIC)


def _op(name: str, params: dict, model: str = "tiny:sd15"):
    from operators import build_operator

    return build_operator({"name": name, "model": model, "params": params}, device="cpu")


def _bytes(image: Image.Image) -> bytes:
    return np.asarray(image).tobytes()


def test_transfer_size_determinism_and_meta():
    op = _op("ad-transfer", {"steps": 2, "size": [128, 64]})
    item = {"key": "k", "prompt": None, "style": _picture(1), "content": _picture(2, (100, 80)), "seed": 5}
    first, again = op([item])[0], op([item])[0]
    assert first["key"] == "k" and first["image"].size == (128, 64) and first["image"].mode == "RGB"
    assert "images" not in first
    assert _bytes(first["image"]) == _bytes(again["image"])
    meta = first["meta"]
    assert meta["method"] == "optimize" and meta["steps"] == 2 and meta["layers"] == [10, 16]
    assert meta["size"] == [128, 64] and meta["precision"] == "fp32" and meta["seed"] == 5
    assert meta["content_weight"] == 0.25 and np.isfinite(meta["final_ad_loss"])
    json.dumps(meta)  # metadata goes into the shard's KEY.json


def test_missing_inputs_give_error_dicts():
    transfer = _op("ad-transfer", {"steps": 1})
    out = transfer([{"key": "a", "style": _picture(1), "content": None, "seed": 0},
                    {"key": "b", "style": None, "content": _picture(2), "seed": 0}])
    assert [r["key"] for r in out] == ["a", "b"]
    assert all("error" in r and "image" not in r for r in out)
    assert "content" in out[0]["error"] and "style" in out[1]["error"]


def test_bad_params_raise():
    with pytest.raises(ValueError, match="unknown param"):
        _op("ad-t2i", {"stepz": 3})
    with pytest.raises(ValueError, match="method"):
        _op("ad-transfer", {"method": "panorama"})
    with pytest.raises(ValueError, match="layers"):
        _op("ad-t2i", {"layers": [10, 17]})
    with pytest.raises(ValueError, match="tiling"):
        _op("ad-texture", {"tiling": "z"})


def test_t2i_multi_style_and_num_images():
    op = _op("ad-t2i", {"steps": 2, "iters": 1, "num_images": 2})
    style = [_picture(1), _picture(3, (80, 48))]
    item = {"key": "k", "prompt": "a red fox", "style": style, "content": None, "seed": 1}
    out, again, other = op([item, item, {**item, "seed": 2}])
    assert _bytes(out["image"]) == _bytes(again["image"]) and _bytes(out["image"]) != _bytes(other["image"])
    assert len(out["images"]) == 2 and out["images"][0] is out["image"]
    assert all(im.size == (64, 64) for im in out["images"])
    assert _bytes(out["images"][0]) != _bytes(out["images"][1])  # two draws of one batch, not copies
    assert out["meta"]["num_styles"] == 2 and out["meta"]["num_images"] == 2
    assert out["meta"]["adain"] is True and out["meta"]["prompt"] == "a red fox"
    single = _op("ad-t2i", {"steps": 2, "iters": 1})([{"key": "k", "prompt": "a red fox", "style": style[:1],
                                                       "content": None, "seed": 1}])[0]
    assert _bytes(single["image"]) != _bytes(out["image"])  # the second style image takes part


def test_multi_style_keys_are_concatenated_not_averaged():
    from operators.ad import ad_loss, ad_loss_fast, concat_style_kv
    from operators.attention import LayerFeatures

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g) for _ in range(3))
    ks, vs = torch.randn(3, 2, 16, 8, generator=g), torch.randn(3, 2, 16, 8, generator=g)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    reference = ad_loss([q], [ks], [vs], [out])
    fast = ad_loss_fast([LayerFeatures(0, q, k, v, out)], [concat_style_kv(ks, vs)])
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=0)
    # joint attention over all 48 style tokens
    joint = torch.nn.functional.scaled_dot_product_attention(
        q, ks.transpose(0, 1).reshape(1, 2, 48, 8).expand(2, -1, -1, -1),
        vs.transpose(0, 1).reshape(1, 2, 48, 8).expand(2, -1, -1, -1))
    torch.testing.assert_close(reference, (out - joint).abs().mean(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("method, params, size", [
    ("optimize", {"steps": 2, "tiling": "xy", "num_images": 2}, (64, 64)),
    ("sample", {"steps": 2, "iters": 1, "tiling": "x"}, (64, 64)),
    ("panorama", {"steps": 2, "iters": 1, "size": [128, 64], "view_batch_size": 4}, (128, 64)),
])
def test_texture_methods(method, params, size):
    out = _op("ad-texture", {"method": method, **params})([{"key": "t", "style": _picture(4), "seed": 2}])[0]
    assert out["image"].size == size
    assert out["meta"]["method"] == method and out["meta"]["tiling"] == params.get("tiling", "none")
    assert len(out.get("images", [out["image"]])) == params.get("num_images", 1)


def test_tiling_makes_the_unet_wrap_around_and_is_undone():
    from operators.ad import circular_padding, load_ad_model

    model = load_ad_model("tiny:sd15")
    convs = [m for m in model.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    before = [c.padding for c in convs]
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = model.null_cond(128, 128).batch(1)
    with torch.no_grad(), circular_padding([model.unet], "xy"):
        out = model.unet(x, 500, **cond)[0]
        shifted = model.unet(torch.roll(x, shifts=(8, 8), dims=(2, 3)), 500, **cond)[0]
    # 3 stride-2 stages: a shift by 8 latent pixels commutes with the network when every conv wraps around
    torch.testing.assert_close(torch.roll(out, shifts=(8, 8), dims=(2, 3)), shifted, rtol=1e-4, atol=1e-4)
    assert [c.padding for c in convs] == before
    with torch.no_grad():
        plain = model.unet(torch.roll(x, shifts=(8, 8), dims=(2, 3)), 500, **cond)[0]
    assert not torch.allclose(plain, shifted, atol=1e-3)


def test_sdxl_smoke_layers_and_checkpointing():
    from operators.ad import ADConfig, load_ad_model, optimize

    op = _op("ad-t2i", {"steps": 2, "iters": 1}, model="tiny:sdxl")
    out = op([{"key": "x", "prompt": "a cat", "style": _picture(5), "content": None, "seed": 0}])[0]
    assert out["image"].size == (128, 128) and out["meta"]["layers"] == [64, 70]
    assert out["meta"]["guidance_scale"] == 7.0  # SDXL notebook default
    # fast path with gradient checkpointing + early exit gives the same gradients as without
    plain, ckpt = load_ad_model("tiny:sdxl"), load_ad_model("tiny:sdxl", checkpointing=True)
    assert ckpt.unet.is_gradient_checkpointing
    style = plain.encode_images(torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    cfg = ADConfig(layers=(64, 70), steps=2, fast=True)
    a, b = (optimize(m, style, None, num_images=1, height=16, width=16, cfg=cfg,
                     generator=torch.Generator().manual_seed(0)) for m in (plain, ckpt))
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-5, atol=1e-6)
    assert a.ad_losses == pytest.approx(b.ad_losses, rel=1e-5)


@pytest.mark.parametrize("precision, fast", [("fp32", True), ("bf16", True)])
def test_fast_mode_final_loss_close_to_reference(precision, fast):
    from operators.ad import ADConfig, load_ad_model, optimize, pil_to_tensor

    case = json.loads((FIXTURES / "cases.json").read_text())["cases"]["optimize_texture"]

    def final_loss(model, fast: bool) -> float:
        style = model.encode_images(torch.cat([pil_to_tensor(Image.open(FIXTURES / p)) for p in case["style"]]))
        cfg = ADConfig(layers=tuple(case["layers"]), lr=case["lr"], iters=case["iters"],
                       steps=case["num_inference_steps"], fast=fast)
        run = optimize(model, style, None, num_images=case["batch_size"], height=8, width=8, cfg=cfg,
                       generator=torch.Generator().manual_seed(case["seed"]))
        return run.final_ad_loss

    reference = final_loss(load_ad_model(str(FIXTURES / "model")), fast=False)
    fast_loss = final_loss(load_ad_model(str(FIXTURES / "model"), precision=precision), fast=fast)
    assert fast_loss == pytest.approx(reference, rel=0.05)


@pytest.mark.parametrize("num_images", [1, 2])
def test_fast_mode_keeps_the_exact_content_tie_at_the_first_iteration(num_images):
    """At the first iteration of optimisation-based transfer the latent is the content latent: q == q_c, so the
    content loss (and its L1 subgradient) is exactly 0 in the fast mode too, as in the reference."""
    from operators.ad import ADConfig, load_ad_model, optimize, pil_to_tensor

    model = load_ad_model(str(FIXTURES / "model"))
    style = model.encode_images(pil_to_tensor(_picture(3)))
    content = model.encode_images(pil_to_tensor(_picture(4)))
    runs = {}
    for fast in (False, True):
        cfg = ADConfig(layers=(0, model.tap.num_self_layers), steps=3, content_weight=0.25, fast=fast,
                       feature_chunk=2)
        runs[fast] = optimize(model, style, content, num_images=num_images, height=8, width=8, cfg=cfg,
                              generator=torch.Generator().manual_seed(0))
    # (The reference, like the authors' code, takes q_c from a batch of one: exact for one image only.)
    for run in [runs[True]] + ([runs[False]] if num_images == 1 else []):
        assert run.losses[0] == run.ad_losses[0]  # the content part is 0.0, not rounding noise
        assert run.losses[1] != run.ad_losses[1]  # and it is a real loss once the latent has moved
    # The first Adam step then follows the same signs: the latents after it agree to rounding.
    assert runs[True].ad_losses[0] == pytest.approx(runs[False].ad_losses[0], rel=1e-5)


def test_panorama_fast_mode_draws_the_noise_of_the_reference(monkeypatch):
    """Fresh style noise per window batch and step in both modes (the reference's draws, in its order)."""
    from operators import ad

    model = ad.load_ad_model("tiny:sd15")
    style = model.encode_images(pil_to_tensor_for(model))
    draws = {}
    from operators.ad import textures

    real = textures.draw_step_noise
    for fast in (False, True):
        calls = []

        def counted(*args, _calls=calls, **kwargs):
            noise = real(*args, **kwargs)
            _calls.append(noise.style.clone())
            return noise

        monkeypatch.setattr(textures, "draw_step_noise", counted)
        cfg = ad.ADConfig(layers=model.default_layers(), steps=2, iters=1, fast=fast)
        window = int(model.unet.config.sample_size)
        ad.panorama(model, style, num_images=1, height=window, width=2 * window, stride=window // 2,
                    view_batch_size=1, adain_on=True, cfg=cfg, generator=torch.Generator().manual_seed(0))
        draws[fast] = calls
    assert len(draws[False]) == 2 * 3  # steps x window batches (three windows of one)
    assert len(draws[True]) == len(draws[False])
    assert all(torch.equal(a, b) for a, b in zip(draws[True], draws[False], strict=True))


def pil_to_tensor_for(model) -> torch.Tensor:
    from operators.ad import pil_to_tensor

    size = model.native_size
    return pil_to_tensor(_picture(6, (size, size)))


def test_start_time_delays_ad_to_the_later_steps():
    from operators.ad import ADConfig, load_ad_model, pil_to_tensor, sample

    model = load_ad_model(str(FIXTURES / "model"))
    style = model.encode_images(pil_to_tensor(_picture(3)))

    def run(start_time: float, iters: int = 2):
        cfg = ADConfig(layers=(0, model.tap.num_self_layers), steps=4, iters=iters)
        return sample(model, style, None, prompt="", negative_prompt="", num_images=1, height=8, width=8,
                      guidance_scale=1.0, adain_on=True, cfg=cfg, generator=torch.Generator().manual_seed(0),
                      start_time=start_time)

    scheduler = model.scheduler()
    scheduler.set_timesteps(4)
    timesteps = [int(t) for t in scheduler.timesteps]
    assert len(run(999).ad_losses) == 4 * 2  # the default: AD after every step
    late = run(timesteps[1])  # AD only after the steps at t < timesteps[1]: the last two
    assert len(late.ad_losses) == 2 * 2
    never = run(0)
    assert never.ad_losses == [] and torch.equal(never.latents, run(999, iters=0).latents)  # plain DDIM, no draws
    assert not torch.equal(late.latents, never.latents)


def test_init_from_style_starts_from_the_noised_style_latent(monkeypatch):
    """The authors' SDXL option: after the initial draw, x_T = add_noise(style, randn, 999) (next draw)."""
    from operators import ad

    model = ad.load_ad_model(str(FIXTURES / "model"))
    style = model.encode_images(ad.pil_to_tensor(_picture(3)))
    started = []

    class Recording(ad.ADRun):
        def __init__(self, latents, *args, **kwargs):
            started.append(latents.clone())
            super().__init__(latents, *args, **kwargs)

    from operators.ad import sd

    monkeypatch.setattr(sd, "ADRun", Recording)
    cfg = ad.ADConfig(layers=(0, model.tap.num_self_layers), steps=2, iters=1)
    ad.sample(model, style, None, prompt="", negative_prompt="", num_images=2, height=8, width=8,
              guidance_scale=1.0, adain_on=False, cfg=cfg, generator=torch.Generator().manual_seed(5),
              init_from_style=True)
    gen = torch.Generator().manual_seed(5)
    torch.randn((2, 4, 8, 8), generator=gen)  # the initial latent is drawn first, then replaced
    noise = torch.randn((2, 4, 8, 8), generator=gen)
    expected = model.scheduler().add_noise(torch.cat([style, style]), noise, torch.tensor([999]))
    torch.testing.assert_close(started[0], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="init_from_style"):
        ad.sample(model, style, None, prompt="", negative_prompt="", num_images=1, height=16, width=16,
                  guidance_scale=1.0, adain_on=False, cfg=cfg, generator=torch.Generator().manual_seed(5),
                  init_from_style=True)
