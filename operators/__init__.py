"""Operator registry: turns an operator config into a callable that stylizes a batch.

Contract (docs/architecture.md §6): ``op(items) -> results``, one result per item, same order.
An item is ``{"key", "prompt", "style", "content", "seed"}`` where ``style`` is a PIL image (or a list of
them for operators that take several) and ``content`` a PIL image or None. A result is
``{"key", "image": PIL.Image, "meta": dict}``; an operator may instead return
``{"key", "error": "reason"}`` for a sample it cannot make, which the pipeline records as ``failed``.

Operators never import Ray or pipeline code; heavy modules are imported lazily so that building the
weight-free ``color-transfer`` operator does not pay for diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

# name -> "module:factory". A factory is called as factory(model=..., params=..., device=...).
_REGISTRY: dict[str, str] = {
    "color-transfer": "operators.color_transfer:ColorTransfer",
    "sissi": "operators.sissi:SissiOperator",
    "ad-t2i": "operators.ad:ADText2Image",
    "ad-transfer": "operators.ad:ADTransfer",
    "ad-texture": "operators.ad:ADTexture",
}


class Operator(Protocol):
    """What the pipeline needs from an operator."""

    name: str

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]: ...


class UnknownOperatorError(ValueError):
    """Raised for an operator name that is not registered."""


def operator_names() -> list[str]:
    return sorted(_REGISTRY)


def _factory(name: str):
    if name not in _REGISTRY:
        raise UnknownOperatorError(f"unknown operator {name!r}; known: {', '.join(operator_names())}")
    module_name, factory_name = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), factory_name)


def check_params(name: str, params: dict[str, Any] | None, model: str | None = None) -> None:
    """Raise ValueError (one line naming the param) for params operator ``name`` does not know or would ignore;
    loads no model, so a config is refused before any actor starts. ``model`` (the config's spec) is passed to
    operators whose params depend on the model family (``ad-t2i``: SD/SDXL or FLUX)."""
    import inspect

    check = _factory(name).check_params
    if model is not None and "model" in inspect.signature(check).parameters:
        check(dict(params or {}), model=model)
    else:
        check(dict(params or {}))


def build_operator(config: dict[str, Any], device: str = "cpu") -> Operator:
    """Build an operator from ``{"name", "model", "params"}`` (extra keys are ignored)."""
    factory = _factory(config.get("name"))
    return factory(model=config.get("model"), params=dict(config.get("params") or {}), device=device)
