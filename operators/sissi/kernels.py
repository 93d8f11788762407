"""Softmax attention that also returns each query's log-sum-exp, on the fused kernel torch has for the device.

Why a module of its own: DSSI (:mod:`~operators.sissi.dssi`) needs every branch's log-sum-exp to rebuild the
joint softmax's branch masses without a score matrix, and torch exposes that only through private aten kernels
whose choice depends on device and dtype. That choice, and the fallback to the math path when a kernel refuses
an input (warned once per kernel, device and dtype in ``warned_fallback``), is the one place of the package
that follows torch internals (pyproject.toml says why torch is capped).
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__package__)  # "operators.sissi", the name these log lines had before the split

warned_fallback: set[str] = set()


def math_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Reference path: one branch's score matrix at a time, in at least fp32."""
    ctype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(ctype), k.to(ctype).transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.to(ctype))
    return out.to(q.dtype), lse


def cpu_flash_lse(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]
    return out, lse


def cuda_flash_lse(q, k, v, scale):
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return res[0], res[1]


def cuda_efficient_lse(q, k, v, scale):
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
    return res[0], res[1][..., : q.shape[-2]]  # the kernel pads the LSE's query axis


def pick_kernel(q: torch.Tensor):
    if q.device.type == "cpu":
        return cpu_flash_lse
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0:
            return cuda_flash_lse
        return cuda_efficient_lse
    return math_attention_lse


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its per-query log-sum-exp (in fp32 or wider): ``(B,H,Nq,D), (B,H,Nq)``.

    Uses the fused kernel torch has for the device (flash on CPU/CUDA, mem-efficient for fp32 CUDA) and falls
    back to the math path when the kernel refuses the input. An empty key set gives zeros and ``-inf``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if k.shape[-2] == 0:
        lse_dtype = torch.promote_types(q.dtype, torch.float32)
        return q.new_zeros(q.shape[:-1] + v.shape[-1:]), q.new_full(q.shape[:-1], -math.inf, dtype=lse_dtype)
    kernel = pick_kernel(q)
    if torch.compiler.is_compiling():
        return kernel(q, k, v, scale)
    try:
        out, lse = kernel(q, k, v, scale)
        if lse.shape != q.shape[:-1]:
            raise RuntimeError(f"unexpected LSE shape {tuple(lse.shape)}")
        return out, lse
    except (RuntimeError, NotImplementedError) as err:
        name = f"{kernel.__name__}:{q.device.type}:{q.dtype}"
        if name not in warned_fallback:
            warned_fallback.add(name)
            logger.warning("fused attention %s unavailable (%s); using the math path", name, err)
        return math_attention_lse(q, k, v, scale)

