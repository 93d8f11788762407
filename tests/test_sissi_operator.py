"""The Sissi operator end to end on a tiny offline FluxFill (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from operators import build_operator
from operators.sissi import SissiOperator
from operators.tiny_flux import save_tiny_flux_fill

PANEL = 64
BASE = {"panel_size": PANEL, "steps": 2, "guidance": 30.0, "max_sequence_length": 64}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_flux_fill(tmp_path_factory.mktemp("tiny-flux-fill"), seed=0))


def _style(seed: int, size=(80, 56), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return image.convert(mode)


@pytest.fixture(scope="module")
def items():
    return [
        {"key": "fox", "prompt": "a red fox", "style": _style(1), "content": None, "seed": 0},
        {"key": "long", "prompt": "a tower " * 400, "style": _style(2, (40, 90), "RGBA"), "content": None, "seed": 7},
        {"key": "empty", "prompt": "", "style": _style(3, (64, 64), "P"), "content": None, "seed": 123},
    ]


def _op(model_dir: str, **dssi) -> SissiOperator:
    return SissiOperator(model=model_dir, params={**BASE, "dssi": dssi}, device="cpu")


def _arrays(op: SissiOperator, items) -> np.ndarray:
    canvases = [op.canvas(it["style"]) for it in items]
    return op.generate([op.prompt_for(it["prompt"]) for it in items], canvases, [it["seed"] for it in items])


def test_vanilla_reproduces_off_and_dynamic_differs(model_dir, items):
    off = _arrays(_op(model_dir, mode="off"), items)
    vanilla = _arrays(_op(model_dir, mode="vanilla"), items)
    dynamic = _arrays(_op(model_dir, mode="dynamic"), items)
    assert off.shape == (3, PANEL, PANEL, 3)
    assert np.abs(vanilla - off).max() <= 1e-4
    assert np.abs(dynamic - off).max() > 1e-3


def test_batch_of_different_items(model_dir, items):
    op = build_operator({"name": "sissi", "model": model_dir, "params": {**BASE, "dssi.mode": "dynamic"}})
    results = op(items)
    assert [r["key"] for r in results] == [it["key"] for it in items]
    for result, item in zip(results, items, strict=True):
        assert result["image"].size == (PANEL, PANEL) and result["image"].mode == "RGB"
        assert result["meta"]["seed"] == item["seed"]
    again = op(items)
    for a, b in zip(results, again, strict=True):
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    # a sample's output does not depend on its neighbours in the batch
    alone = _arrays(op, items[1:2])[0]
    assert np.abs(_arrays(op, items)[1] - alone).max() <= 1e-4
    # the seed matters
    reseeded = op([{**items[0], "seed": 1}])[0]["image"]
    assert not np.array_equal(np.asarray(reseeded), np.asarray(results[0]["image"]))


def test_bad_sample_fails_alone(model_dir, items):
    op = _op(model_dir, mode="dynamic")
    results = op([items[0], {**items[1], "style": None}, items[2]])
    assert "error" in results[1] and results[1]["key"] == "long"
    assert all("image" in results[i] for i in (0, 2))


def test_meta_records_every_setting(model_dir, items):
    op = SissiOperator(
        model=model_dir,
        params={**BASE, "prompt_template": "diptych", "dssi.mode": "fixed", "dssi": {"lam": 0.25}},
    )
    meta = op(items[:1])[0]["meta"]
    assert meta["operator"] == "sissi" and meta["model"] == model_dir
    assert meta["panel_size"] == [PANEL, PANEL] and meta["canvas_size"] == [2 * PANEL, PANEL]
    assert meta["steps"] == 2 and meta["guidance"] == 30.0 and meta["dtype"] == "float32"
    assert meta["dssi"]["mode"] == "fixed" and meta["dssi"]["lam"] == 0.25
    assert meta["dssi"]["compose"] == "mass_preserving" and meta["dssi"]["steps"] == [0.0, 1.0]
    assert meta["prompt_template"] == "diptych" and "a red fox" in meta["prompt"] and "diptych" in meta["prompt"]


def test_layer_and_step_gating(model_dir, items):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    off = _op(model_dir, mode="off")
    assert all(type(p) is FluxAttnProcessor for p in off.pipe.transformer.attn_processors.values())

    op = _op(model_dir, mode="dynamic", layers="double", steps=[0.5, 1.0], record=True)
    tr = op.pipe.transformer
    n_double = len(tr.transformer_blocks)
    assert op.dssi_layers == list(range(n_double))
    assert all(type(b.attn.processor) is FluxAttnProcessor for b in tr.single_transformer_blocks)
    assert all(type(b.attn.processor) is not FluxAttnProcessor for b in tr.transformer_blocks)
    stats = op(items[:2])[0]["meta"]["dssi_stats"]
    assert stats["steps"] == [1] and stats["calls"] == n_double  # only the second of two steps
    assert 0.0 <= stats["lambda"] <= 1.0
    masses = stats["alpha_text"] + stats["alpha_style"] + stats["alpha_self"]
    assert masses == pytest.approx(1.0, abs=1e-5)


def test_transformer_forward_vanilla_matches_stock(model_dir):
    """The processor itself, in both block types, reproduces the stock processor."""
    stock = _op(model_dir, mode="off").pipe.transformer
    dssi = _op(model_dir, mode="vanilla").pipe.transformer
    tokens = (PANEL // 16) ** 2
    g = torch.Generator().manual_seed(0)
    cfg = stock.config
    img_ids = torch.zeros(2 * tokens, 3)
    img_ids[:, 1] = torch.arange(2 * tokens) // (2 * PANEL // 16)
    img_ids[:, 2] = torch.arange(2 * tokens) % (2 * PANEL // 16)
    kwargs = dict(
        hidden_states=torch.randn(2, 2 * tokens, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(2, 64, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.7, 0.3]),
        guidance=torch.tensor([30.0, 30.0]),
        txt_ids=torch.zeros(64, 3),
        img_ids=img_ids,
        return_dict=False,
    )
    with torch.inference_mode():
        torch.testing.assert_close(dssi(**kwargs)[0], stock(**kwargs)[0], rtol=0, atol=1e-4)


def test_tiny_model_is_deterministic_and_safetensors(tmp_path):
    from safetensors.torch import load_file

    a = save_tiny_flux_fill(tmp_path / "a", seed=5)
    b = save_tiny_flux_fill(tmp_path / "b", seed=5)
    c = save_tiny_flux_fill(tmp_path / "c", seed=6)
    assert not list(a.rglob("*.bin")) and not list(a.rglob("*.pt"))
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert {f.parts[0] for f in files} >= {"transformer", "vae", "text_encoder", "text_encoder_2"}
    wa, wb, wc = (load_file(root / "transformer" / files[-1].name) for root in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_tiny_spec_resolves_through_cache(tmp_path, monkeypatch, items):
    monkeypatch.setenv("STYLEGEN_CACHE", str(tmp_path))
    op = build_operator({"name": "sissi", "model": "tiny:flux-fill", "params": {**BASE, "dssi.mode": "printed"}})
    result = op(items[:1])[0]
    assert result["image"].size == (PANEL, PANEL) and result["meta"]["model"] == "tiny:flux-fill"


def test_panel_size_must_fit_tokens(model_dir):
    with pytest.raises(ValueError):
        SissiOperator(model=model_dir, params={**BASE, "panel_size": 40})


def test_text_tokens_prompt_changes_only_short_prompts(model_dir, items):
    full = _op(model_dir, mode="dynamic_norm")
    prompt = _op(model_dir, mode="dynamic_norm", text_tokens="prompt")
    lens = prompt.prompt_lengths([prompt.prompt_for(it["prompt"]) for it in items])
    assert lens[0] < BASE["max_sequence_length"] == lens[1] and lens[2] == 1  # "" is the end token alone
    assert np.abs(_arrays(prompt, items[:1]) - _arrays(full, items[:1])).max() > 1e-4
    assert np.array_equal(_arrays(prompt, items[1:2]), _arrays(full, items[1:2]))  # fills max_sequence_length
    mixed = _arrays(prompt, items[:2])  # per-item text key counts in one batch
    assert np.abs(mixed[1] - _arrays(full, items[1:2])[0]).max() <= 1e-5
    meta = prompt(items[:1])[0]["meta"]
    assert meta["dssi"]["text_tokens"] == "prompt" and meta["dssi"]["text_keys"] == lens[0]


def test_record_lambda_per_layer_group_and_step(model_dir, items):
    op = _op(model_dir, mode="dynamic_norm", record=True)
    stats = op(items[:2])[1]["meta"]["dssi_stats"]
    per_step = stats["lambda_per_step"]
    assert set(per_step) == {"double", "single"} and all(set(g) == {"0", "1"} for g in per_step.values())
    for group in per_step.values():
        for rec in group.values():
            assert 0.0 < rec["min"] <= rec["mean"] <= rec["max"] < 1.0
    assert per_step["double"]["0"]["min"] < per_step["double"]["0"]["max"]  # heads and layers differ


def test_several_style_images_fail_the_sample(model_dir, items):
    op = _op(model_dir, mode="dynamic_norm")
    results = op([{**items[0], "style": [_style(1), _style(2)]}, {**items[0], "style": [_style(1)]}])
    assert "2 style images" in results[0]["error"] and "image" not in results[0]
    assert np.array_equal(np.asarray(results[1]["image"]), np.asarray(op(items[:1])[0]["image"]))


def test_first_block_cache_is_off_by_default_and_approximate(model_dir, items):
    """Recorded on the tiny model, 4 steps, 2 items, pixels in [0, 1]: threshold 1e-9 never skips (diff 0.0);
    0.05 and 0.2 skip nothing either here (0.0); 1.0 reuses steps (max diff 0.044)."""
    params = {**BASE, "steps": 4}
    stock = _arrays(SissiOperator(model=model_dir, params=params), items[:2])
    exact = SissiOperator(model=model_dir, params={**params, "cache": "first_block", "cache_threshold": 1e-9})
    assert np.abs(_arrays(exact, items[:2]) - stock).max() <= 1e-6
    loose = SissiOperator(model=model_dir, params={**params, "cache": "first_block", "cache_threshold": 1.0})
    first = _arrays(loose, items[:2])
    assert 1e-3 < np.abs(first - stock).max() < 0.1
    assert np.array_equal(_arrays(loose, items[:2]), first)  # no residual carried across calls
    assert SissiOperator.check_params({"cache": "first_block"}) is None
    with pytest.raises(ValueError):
        SissiOperator.check_params({"cache": "teacache"})


def test_attention_backend_reaches_the_stock_rows_of_dssi_layers(model_dir, items):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from torch.profiler import ProfilerActivity, profile

    before = _AttentionBackendRegistry._active_backend
    default = _op(model_dir, mode="vanilla")
    math = SissiOperator(model=model_dir, params={**BASE, "attention_backend": "_native_math", "dssi.mode": "vanilla"})
    assert _AttentionBackendRegistry._active_backend == before  # no process-wide side effect

    def math_calls(op):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            arrays = _arrays(op, items[:1])
        return arrays, sum(e.count for e in prof.key_averages() if "attention_math" in e.key)

    base, n_default = math_calls(default)
    out, n_math = math_calls(math)
    layers = len(math.dssi_layers)
    assert n_default == 0 and n_math >= layers * BASE["steps"]  # every DSSI layer's stock rows, every step
    assert np.abs(out - base).max() <= 1e-4  # recorded: 1.4e-6, math vs CPU-flash SDPA on the tiny model, fp32
    with pytest.raises(ValueError):
        SissiOperator.check_params({"attention_backend": "nope"})
