"""Operator registry: turns an operator config into a callable that stylizes a batch.

Contract (docs/architecture.md §6): ``op(items) -> results``, one result per item, same order.
An item is ``{"key", "prompt", "style", "content", "seed"}`` where ``style`` is a PIL image (or a list of
them for operators that take several) and ``content`` a PIL image or None. A result is
``{"key", "image": PIL.Image, "meta": dict}``; an operator may instead return
``{"key", "error": "reason"}`` for a sample it cannot make, which the pipeline records as ``failed``.

Operators never import Ray or pipeline code; heavy modules are imported lazily so that building the
weight-free ``color-transfer`` operator does not pay for diffusers.

Plug-ins: an operator name of the form ``package.module:Factory`` (the README's "Your own operator") is built the
same way as a registered one, from a module importable where the actors run. Naming code to import is the
user's act: a config read from an output (``run.json``) never imports one (:func:`is_plugin` lets callers tell).
"""

from __future__ import annotations

import importlib
import re
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
    """Raised for an operator name that is not registered, or a plug-in path that does not import."""


# ``package.module:Factory`` (dotted names; the factory may be an attribute path such as ``Class.build``)
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
PLUGIN_PATTERN = re.compile(rf"^{_DOTTED}:{_DOTTED}$")


def operator_names() -> list[str]:
    return sorted(_REGISTRY)


def is_plugin(name: Any) -> bool:
    """Whether ``name`` is a plug-in path (``package.module:Factory``) rather than a registered name."""
    return isinstance(name, str) and name not in _REGISTRY and bool(PLUGIN_PATTERN.match(name))


def check_name(name: Any) -> None:
    """Raise UnknownOperatorError unless ``name`` is registered or spelled as a plug-in path (imports nothing)."""
    if not (isinstance(name, str) and (name in _REGISTRY or is_plugin(name))):
        raise UnknownOperatorError(f"unknown operator {name!r}; known: {', '.join(operator_names())}, or "
                                   "'package.module:Factory' for your own")


def _factory(name: str):
    check_name(name)
    module_name, attr_path = (_REGISTRY.get(name) or name).split(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        if name in _REGISTRY:
            raise
        raise UnknownOperatorError(f"operator {name!r}: cannot import {module_name!r} ({exc}); install it, or ship "
                                   "it with ray.runtime_env (py_modules or working_dir)") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UnknownOperatorError(f"operator {name!r}: {module_name!r} has no {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UnknownOperatorError(f"operator {name!r}: {attr_path!r} is not callable")
    return obj


def check_params(name: str, params: dict[str, Any] | None, model: str | None = None) -> None:
    """Raise ValueError (one line naming the param) for params operator ``name`` does not know or would ignore;
    loads no model, so a config is refused before any actor starts. ``model`` (the config's spec) is passed to
    operators whose params depend on the model family (``ad-t2i``: SD/SDXL or FLUX)."""
    import inspect

    check = getattr(_factory(name), "check_params", None)
    if check is None:  # a plug-in without the optional hook: its params are its own business
        return
    if model is not None and "model" in inspect.signature(check).parameters:
        check(dict(params or {}), model=model)
    else:
        check(dict(params or {}))


def build_operator(config: dict[str, Any], device: str = "cpu") -> Operator:
    """Build an operator from ``{"name", "model", "params"}`` (extra keys are ignored)."""
    factory = _factory(config.get("name"))
    return factory(model=config.get("model"), params=dict(config.get("params") or {}), device=device)
