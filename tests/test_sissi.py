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
    kernels,
    parse_params,
)
from operators.sissi.modes import lambda_for

MODES = [m for m in sissi.MODES if m != "off"]


def _softmax_attention(q, k, v):
    scores = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ v.double()


def _reference(q, k, v, text_len, style_index, output_index, mode, lam, compose):
    """docs/research/sissi.md §4.5 written out with full score matrices in float64."""
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
    elif mode == "dynamic_norm":  # geometric mean over target queries of the per-key joint-mass ratio
        rho_s, rho_t = a["s"] / style.numel(), a["t"] / text_len
        gamma = torch.exp(torch.log(rho_s / rho_t).mean(2, keepdim=True))
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

    monkeypatch.setattr(kernels, "cpu_flash_lse", broken)
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
    assert parse_params({}).dssi.mode == "dynamic_norm"  # the default (README: why)


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


# --------------------------------------------------------------------------------------------------
# dynamic_norm: token-count invariance and response to activations; text_tokens: prompt
# --------------------------------------------------------------------------------------------------


def _duplicated(q, k, v, text_len, style_index, output_index, which):
    """The same tokens with every text, style or target token (query, key and value) present twice."""
    text, img = (slice(0, text_len), slice(text_len, None))
    n_img = q.shape[2] - text_len
    if which == "text":
        cat = [torch.cat([x[:, :, text], x[:, :, text], x[:, :, img]], 2) for x in (q, k, v)]
        return cat, 2 * text_len, style_index, output_index
    extra = style_index if which == "style" else output_index
    cat = [torch.cat([x, x[:, :, extra + text_len]], 2) for x in (q, k, v)]
    added = n_img + torch.arange(extra.numel())
    if which == "style":
        return cat, text_len, torch.cat([style_index, added]), output_index
    return cat, text_len, style_index, torch.cat([output_index, added])


@pytest.mark.parametrize("which", ["text", "style", "target"])
def test_dynamic_norm_is_invariant_to_duplicated_tokens(which):
    (q, k, v), text_len, style_index, output_index = _inputs(dtype=torch.float64, seed=11)
    kwargs = dict(text_len=text_len, style_index=style_index, output_index=output_index, compose="replace")
    base = dssi_attention(q, k, v, **kwargs, mode="dynamic_norm")[:, :, output_index + text_len]
    (q2, k2, v2), t2, s2, o2 = _duplicated(q, k, v, text_len, style_index, output_index, which)
    kwargs2 = dict(text_len=t2, style_index=s2, output_index=o2, compose="replace")
    dup = dssi_attention(q2, k2, v2, **kwargs2, mode="dynamic_norm")
    copies = 2 if which == "target" else 1
    for c in range(copies):
        rows = dup[:, :, o2[c * output_index.numel() : (c + 1) * output_index.numel()] + t2]
        torch.testing.assert_close(rows, base, rtol=0, atol=1e-6)
    # the count-dominated reading moves under the same change, so the invariance above is not vacuous
    old = dssi_attention(q, k, v, **kwargs, mode="dynamic")[:, :, output_index + text_len]
    old_dup = dssi_attention(q2, k2, v2, **kwargs2, mode="dynamic")[:, :, o2[: output_index.numel()] + t2]
    assert (old_dup - old).abs().max() > 1e-4


def _lambda(mode, q, k, text_len, style_index, output_index):
    """Lambda per (batch, head) from float64 branch log-sum-exps, as _dssi_rows (operators.sissi.dssi) computes it."""
    q, k = q.double(), k.double()
    qo = q[:, :, output_index + text_len]
    scale = q.shape[-1] ** -0.5
    style = style_index + text_len
    self_idx = torch.tensor([i for i in range(text_len, q.shape[2]) if i not in set(style.tolist())])
    lse = {n: torch.logsumexp(qo @ k[:, :, idx].transpose(-1, -2) * scale, -1, keepdim=True)
           for n, idx in (("t", torch.arange(text_len)), ("s", style), ("o", self_idx))}
    lse_all = torch.logsumexp(torch.cat(list(lse.values()), -1), -1, keepdim=True)
    a_t, a_s = (torch.exp(lse[n] - lse_all) for n in ("t", "s"))
    return lambda_for(mode, 0.5, a_t, a_s, lse["t"], lse["s"], text_len, style.numel())


def test_dynamic_norm_lambda_follows_branch_activations():
    (q, k, _), text_len, style_index, output_index = _inputs(dtype=torch.float64, seed=12)
    args = (text_len, style_index, output_index)
    lam = _lambda("dynamic_norm", q, k, *args)
    assert lam.shape == (q.shape[0], q.shape[1], 1, 1) and ((lam > 0) & (lam < 1)).all()
    scaled = k.clone()
    scaled[:, :, style_index + text_len] *= 1.5
    assert (_lambda("dynamic_norm", q, scaled, *args) - lam).abs().max() > 1e-3
    # Proposition 1: raising every style activation by c per query raises the lambda logit by mean(c)
    q_bar = q[:, :, output_index + text_len].mean(2, keepdim=True)  # (B,H,1,D)
    shifted = k.clone()
    shifted[:, :, style_index + text_len] += 0.7 * q_bar
    lam2 = _lambda("dynamic_norm", q, shifted, *args)
    expected = torch.logit(lam) + 0.7 * (q_bar**2).sum(-1, keepdim=True) / q.shape[-1] ** 0.5
    torch.testing.assert_close(torch.logit(lam2), expected, rtol=0, atol=1e-9)
    assert (lam2 > lam).all()


def test_dynamic_norm_equal_activations_give_one_half():
    """Identical text and style keys (any counts): per-key masses are equal, lambda is exactly 1/2."""
    (q, k, v), text_len, style_index, output_index = _inputs(dtype=torch.float64, seed=13, text_len=6)
    k[:, :, style_index + text_len] = k[:, :, :text_len]
    lam = _lambda("dynamic_norm", q, k, text_len, style_index, output_index)
    torch.testing.assert_close(lam, torch.full_like(lam, 0.5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["dynamic_norm", "vanilla", "dynamic"])
def test_prompt_len_changes_only_the_target_rows_of_short_prompts(mode):
    (q, k, v), text_len, style_index, output_index = _inputs(dtype=torch.float64, seed=14)
    kwargs = dict(text_len=text_len, style_index=style_index, output_index=output_index, mode=mode)
    full = dssi_attention(q, k, v, **kwargs)
    short = text_len - 4
    out = dssi_attention(q, k, v, **kwargs, prompt_len=[short, text_len])
    targets = output_index + text_len
    others = _others(q.shape[2], text_len, output_index)
    assert torch.equal(out[:, :, others], full[:, :, others])  # stock rows keep every key
    assert torch.equal(out[1], full[1])  # a prompt as long as the text branch: nothing changes
    assert (out[0, :, targets] - full[0, :, targets]).abs().max() > 1e-4
    # item 0's target rows are DSSI over a sequence without its padding tokens
    keep = torch.cat([torch.arange(short), torch.arange(text_len, q.shape[2])])
    trimmed = dssi_attention(*(x[:1, :, keep] for x in (q, k, v)), **{**kwargs, "text_len": short})
    torch.testing.assert_close(out[:1, :, targets], trimmed[:, :, output_index + short], rtol=0, atol=1e-10)
    assert torch.equal(dssi_attention(q, k, v, **kwargs, prompt_len=text_len), full)
