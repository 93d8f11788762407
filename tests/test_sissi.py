"""DSSI attention (operators.sissi.dssi_attention) against an independent float64 reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from operators import sissi
from operators.sissi import (
    COMPOSES,
    attention_with_lse,
    diptych_layout,
    dssi_attention,
    dssi_lambda,
    dssi_objective,
    parse_params,
)

MODES = [m for m in sissi.MODES if m != "off"]


def _softmax_attention(q, k, v):
    scores = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ v.double()


def _reference(q, k, v, text_len, style_index, output_index, mode, lam, compose):
    """research/sissi.md §4.5 written out with full score matrices in float64."""
    q, k, v = q.double(), k.double(), v.double()
    out = _softmax_attention(q, k, v)
    n_img = q.shape[2] - text_len
    style = style_index + text_len
    self_idx = torch.tensor([i for i in range(n_img) if i not in set(style_index.tolist())]) + text_len
    target = output_index + text_len
    qo = q[:, :, target]
    scale = q.shape[-1] ** -0.5
    branch = {}
    for name, idx in (("t", torch.arange(text_len)), ("s", style), ("o", self_idx)):
        scores = qo @ k[:, :, idx].transpose(-1, -2) * scale
        branch[name] = (scores, v[:, :, idx])
    lse = {b: torch.logsumexp(sc, -1, keepdim=True) for b, (sc, _) in branch.items()}
    res = {b: torch.softmax(sc, -1) @ vv for b, (sc, vv) in branch.items()}
    lse_all = torch.logsumexp(torch.cat([lse["t"], lse["s"], lse["o"]], -1), -1, keepdim=True)
    a = {b: torch.exp(lse[b] - lse_all) for b in lse}
    if mode == "vanilla":
        lam_t = a["s"] / (a["t"] + a["s"])
    elif mode == "printed":
        lam_t = torch.tensor(0.5, dtype=torch.float64)
    elif mode == "fixed":
        lam_t = torch.tensor(lam, dtype=torch.float64)
    elif mode == "dynamic":
        gamma = torch.log1p(a["s"].sum(2, keepdim=True)) / torch.log1p(a["t"].sum(2, keepdim=True))
        lam_t = gamma / (1 + gamma)
    else:  # lse_ratio
        gamma = lse["s"].clamp_min(0) / lse["t"].abs()
        lam_t = gamma / (1 + gamma)
    h = (1 - lam_t) * res["t"] + lam_t * res["s"]
    if compose == "mass_preserving":
        rows = (a["t"] + a["s"]) * h + a["o"] * res["o"]
    elif compose == "replace":
        rows = h
    else:
        s2 = torch.softmax(torch.cat([branch["t"][0], branch["o"][0]], -1), -1) @ torch.cat(
            [branch["t"][1], branch["o"][1]], 2
        )
        t2 = torch.softmax(torch.cat([branch["s"][0], branch["o"][0]], -1), -1) @ torch.cat(
            [branch["s"][1], branch["o"][1]], 2
        )
        rows = (1 - lam_t) * s2 + lam_t * t2
    out[:, :, target] = rows
    return out


def _inputs(batch=2, heads=3, text_len=9, grid=(3, 2), head_dim=16, dtype=torch.float32, seed=0):
    style_index, output_index = diptych_layout(*grid)
    n = text_len + 2 * output_index.numel()
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g) * 1.5 for _ in range(3))
    # a style-heavy head, as Proposition 1 describes: larger activations on one branch
    k[:, 0, text_len:] *= 2.0
    return [x.to(dtype) for x in (q, k, v)], text_len, style_index, output_index


def _others(n, text_len, output_index):
    targets = set((output_index + text_len).tolist())
    return torch.tensor([i for i in range(n) if i not in targets])


def test_vanilla_equals_plain_softmax_attention():
    (q, k, v), text_len, style_index, output_index = _inputs()
    out = dssi_attention(q, k, v, text_len=text_len, style_index=style_index, output_index=output_index, mode="vanilla")
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), _softmax_attention(q, k, v), rtol=0, atol=1e-5)


def test_vanilla_exact_in_float64():
    (q, k, v), text_len, style_index, output_index = _inputs(dtype=torch.float64, seed=3)
    out = dssi_attention(q, k, v, text_len=text_len, style_index=style_index, output_index=output_index, mode="vanilla")
    torch.testing.assert_close(out, _softmax_attention(q, k, v), rtol=0, atol=1e-10)


@pytest.mark.parametrize(("mode", "compose"), list(itertools.product(MODES, COMPOSES)))
def test_modes_match_reference_and_leave_other_rows_alone(mode, compose):
    (q, k, v), text_len, style_index, output_index = _inputs(seed=1)
    kwargs = dict(text_len=text_len, style_index=style_index, output_index=output_index)
    out = dssi_attention(q, k, v, **kwargs, mode=mode, lam=0.3, compose=compose)
    ref = _reference(q, k, v, text_len, style_index, output_index, mode, 0.3, compose)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    others = _others(q.shape[2], text_len, output_index)
    plain = _softmax_attention(q, k, v)
    torch.testing.assert_close(out[:, :, others].double(), plain[:, :, others], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["printed", "fixed", "dynamic", "lse_ratio"])
def test_reweighting_modes_change_target_rows(mode):
    (q, k, v), text_len, style_index, output_index = _inputs(seed=2)
    kwargs = dict(text_len=text_len, style_index=style_index, output_index=output_index, lam=0.9)
    out = dssi_attention(q, k, v, **kwargs, mode=mode)
    targets = output_index + text_len
    diff = (out[:, :, targets].double() - _softmax_attention(q, k, v)[:, :, targets]).abs().max()
    assert diff > 1e-3


def test_replace_endpoints_are_pure_branches():
    """lam = 0 gives the text-only result s, lam = 1 the style-only result t."""
    (q, k, v), text_len, style_index, output_index = _inputs(seed=4)
    kwargs = dict(text_len=text_len, style_index=style_index, output_index=output_index)
    targets = output_index + text_len
    qo = q[:, :, targets]
    s = _softmax_attention(qo, k[:, :, :text_len], v[:, :, :text_len])
    t = _softmax_attention(qo, k[:, :, style_index + text_len], v[:, :, style_index + text_len])
    out0 = dssi_attention(q, k, v, **kwargs, mode="fixed", lam=0.0, compose="replace")
    out1 = dssi_attention(q, k, v, **kwargs, mode="fixed", lam=1.0, compose="replace")
    torch.testing.assert_close(out0[:, :, targets].double(), s, rtol=0, atol=1e-5)
    torch.testing.assert_close(out1[:, :, targets].double(), t, rtol=0, atol=1e-5)


def test_closed_form_lambda_minimises_objective():
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    for trial in range(200):
        shape = (int(torch.randint(1, 5, (1,), generator=g)), 8)
        s = torch.randn(shape, generator=g, dtype=torch.float64) * (1 + trial % 7)
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        gamma = float(torch.exp(torch.randn((), generator=g, dtype=torch.float64) * 3))
        lam_star = dssi_lambda(gamma)
        assert 0.0 <= lam_star <= 1.0
        best = dssi_objective(lam_star, s, t, gamma)
        others = torch.stack([dssi_objective(lam, s, t, gamma) for lam in grid])
        assert best <= others.min() + 1e-9 * (1 + abs(float(others.min())))
        # stationary point: the derivative vanishes at lam*
        lam = torch.tensor(lam_star, dtype=torch.float64, requires_grad=True)
        dssi_objective(lam, s, t, gamma).backward()
        assert abs(float(lam.grad)) <= 1e-8 * (1 + float(((s - t) ** 2).sum()) * (1 + gamma))


def test_dynamic_lambda_is_per_batch_element():
    """Batched output equals per-sample outputs: nothing is pooled across the batch."""
    (q, k, v), text_len, style_index, output_index = _inputs(batch=3, seed=5)
    kwargs = dict(text_len=text_len, style_index=style_index, output_index=output_index)
    for mode in ("dynamic", "lse_ratio"):
        batched = dssi_attention(q, k, v, **kwargs, mode=mode)
        for b in range(3):
            single = dssi_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], **kwargs, mode=mode)
            torch.testing.assert_close(batched[b : b + 1], single, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16(mode):
    (q, k, v), text_len, style_index, output_index = _inputs(dtype=torch.bfloat16, seed=6)
    kwargs = dict(text_len=text_len, style_index=style_index, output_index=output_index)
    out = dssi_attention(q, k, v, **kwargs, mode=mode)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    ref = _reference(q, k, v, text_len, style_index, output_index, mode, 0.5, "mass_preserving")
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-2)


def test_attention_with_lse_and_math_fallback(monkeypatch):
    (q, k, v), *_ = _inputs(seed=7)
    scores = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    out, lse = attention_with_lse(q, k, v)
    torch.testing.assert_close(out.double(), _softmax_attention(q, k, v), rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=0, atol=1e-5)

    def broken(*_args):
        raise RuntimeError("kernel unavailable")

    monkeypatch.setattr(sissi, "_cpu_flash_lse", broken)
    out2, lse2 = attention_with_lse(q, k, v)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse2, lse, rtol=0, atol=1e-5)


def test_empty_text_and_validation():
    (q, k, v), _, style_index, output_index = _inputs(text_len=0, seed=8)
    out = dssi_attention(q, k, v, text_len=0, style_index=style_index, output_index=output_index, mode="vanilla")
    torch.testing.assert_close(out.double(), _softmax_attention(q, k, v), rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        dssi_attention(q, k, v, text_len=0, style_index=style_index, output_index=output_index, mode="off")
    with pytest.raises(ValueError):
        dssi_attention(q, k, v, text_len=0, style_index=style_index, output_index=output_index, compose="x")
    with pytest.raises(ValueError):
        dssi_attention(q, k, v, text_len=0, style_index=style_index, output_index=output_index + 100)


def test_diptych_layout_splits_each_row():
    style, target = diptych_layout(3, 2)
    assert style.tolist() == [0, 1, 2, 6, 7, 8]
    assert target.tolist() == [3, 4, 5, 9, 10, 11]


def test_params_nested_and_dotted_are_equivalent():
    nested = parse_params({"steps": 3, "dssi": {"mode": "fixed", "lam": 0.7, "layers": [0, -1], "steps": [0, 0.5]}})
    dotted = parse_params(
        {"steps": 3, "dssi.mode": "fixed", "dssi.lam": 0.7, "dssi.layers": "0,-1", "dssi.steps": "0:0.5"}
    )
    assert nested == dotted
    assert nested.dssi.layers == [0, -1] and nested.dssi.steps == (0.0, 0.5)
    assert parse_params({}).dssi.mode == "dynamic"


@pytest.mark.parametrize(
    "bad",
    [
        {"dssi": {"mode": "loud"}},
        {"dssi.compose": "sum"},
        {"dssi.lam": 1.5},
        {"dssi.steps": [0.6, 0.2]},
        {"dssi.layers": []},
        {"panel_sizes": 64},
        {"prompt_template": "no placeholder"},
        {"dtype": "int8"},
    ],
)
def test_params_rejected(bad):
    with pytest.raises(ValueError):
        parse_params(bad)
