"""Lambda, the text/style mixing weight of DSSI: one function per reading of the paper's gamma (``dssi.mode``).

Why a module of its own: the modes are where the paper is ambiguous (docs/research/sissi.md §4.3), so this is
where a new reading goes: a branch in :func:`lambda_for` and its name in ``MODES``
(:mod:`~operators.sissi.params`). :func:`dssi_lambda` and :func:`dssi_objective` are the paper's closed form
and objective, which the tests check the modes against.
"""

from __future__ import annotations

import torch

from operators.sissi.params import MODES

_EPS = 1e-6


def dssi_lambda(gamma: torch.Tensor | float) -> torch.Tensor | float:
    """Minimiser of ``||h-s||^2 + gamma ||h-t||^2`` over ``h = (1-lam) s + lam t``: ``gamma / (1+gamma)``."""
    return gamma / (1 + gamma)


def dssi_objective(lam: float | torch.Tensor, s: torch.Tensor, t: torch.Tensor, gamma: float | torch.Tensor):
    """The DSSI objective L(lam) (docs/research/sissi.md §4.2), summed over everything but leading batch dims."""
    h = (1 - lam) * s + lam * t
    return ((h - s) ** 2).sum() + gamma * ((h - t) ** 2).sum()



def lambda_for(mode: str, lam: float, a_t, a_s, lse_t, lse_s, n_t=None, n_s=None) -> torch.Tensor:
    """Lambda per (B,H,No,1) or broadcastable; see docs/research/sissi.md §4.3 for each reading.

    ``dynamic_norm`` (the default) is the count-free reading of the paper's gamma. Per target query i the branch
    mass per key is ``rho_b,i = alpha_b,i / N_b``; the joint normaliser cancels in ``rho_s,i / rho_t,i``, leaving
    ``d_i = (LSE_s,i - log N_s) - (LSE_t,i - log N_t)``, the gap between the two branches' log-mean-exp scores,
    i.e. Proposition 1's difference of mean activations ``mu_s - mu_t``. Pooled by mean over the target queries
    (one scalar per batch and head, as the printed sum over "all elements" suggests), ``gamma = exp(mean_i d_i)``
    (the geometric mean of ``rho_s / rho_t``) and ``lambda = gamma / (1 + gamma) = sigmoid(mean_i d_i)``.
    Why this and not the alternatives: a difference of logs is the only comparison of the two branch levels that
    is invariant to adding a constant to a query's scores (softmax is), so no clamp or sign guard is needed,
    unlike a ratio of logs (``dynamic``, ``lse_ratio``); subtracting ``log N_b`` makes it exactly invariant to
    duplicating the text, style or target tokens, which pooling the joint masses by sum (``dynamic``) or even by
    arithmetic mean is not (each query's joint normaliser moves differently); and lambda is 0.5 when both
    branches are equally active per key and moves monotonically with one branch's activations. It equals
    ``vanilla``'s per-query split ``sigmoid(LSE_s - LSE_t)`` with the token-count prior ``log(N_s / N_t)`` removed.
    """
    if mode == "vanilla":  # the joint-softmax split: reproduces plain attention under mass_preserving
        return a_s / (a_t + a_s).clamp_min(torch.finfo(a_s.dtype).tiny)
    if mode == "printed":  # as printed: log(sum A_s)/log(sum A_t) of row-normalised A is 1, so lambda = 1/2
        return torch.full_like(a_s[..., :1, :], 0.5)
    if mode == "fixed":  # FSSI-style ablation
        return torch.full_like(a_s[..., :1, :], float(lam))
    if mode == "dynamic":  # joint-mass log ratio, one scalar per (batch, head), pooled over target queries
        m_t = a_t.sum(dim=-2, keepdim=True)
        m_s = a_s.sum(dim=-2, keepdim=True)
        gamma = torch.log1p(m_s) / torch.log1p(m_t).clamp_min(_EPS)
        return dssi_lambda(gamma).clamp(0, 1)
    if mode == "lse_ratio":  # per target query log-partition ratio (gamma clamped at 0 so lambda is in [0,1])
        gamma = lse_s.clamp_min(0) / (lse_t.abs() + _EPS)
        return dssi_lambda(gamma).clamp(0, 1)
    if mode == "dynamic_norm":  # per-key branch mass log ratio, mean over target queries (docstring above)
        log_n = [torch.as_tensor(n, dtype=lse_t.dtype, device=lse_t.device).clamp_min(1).log() for n in (n_t, n_s)]
        gap = (lse_s - log_n[1]) - (lse_t - log_n[0])  # +inf when there is no text key: lambda 1
        return torch.sigmoid(gap.mean(dim=-2, keepdim=True))
    raise ValueError(f"unknown DSSI mode {mode!r}; known: {', '.join(MODES[1:])}")

