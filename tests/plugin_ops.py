"""Plug-in operators for tests and benchmarks (``operator.name: "tests.plugin_ops:<Factory>"``): each follows the
operator contract of ``operators/__init__.py`` exactly as a user's own would, from outside the registry."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from PIL import Image


class Tint:
    """The style's mean colour blended over the content (or a flat canvas for a prompt alone): cheap and
    deterministic, with an optional ``check_params`` and ``meta``."""

    name = "tint"

    def __init__(self, model: str | None = None, params: dict[str, Any] | None = None, device: str = "cpu"):
        self.check_params(params)
        self.amount = float((params or {}).get("amount", 0.5))
        self.size = int((params or {}).get("size", 64))

    @staticmethod
    def check_params(params: dict[str, Any] | None) -> None:
        unknown = sorted(set(params or {}) - {"amount", "size"})
        if unknown:
            raise ValueError(f"tint: unknown param {unknown[0]!r}; known: amount, size")

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for item in items:
            mean = np.asarray(item["style"], dtype=np.float32).reshape(-1, 3).mean(0)
            base = item["content"] or Image.new("RGB", (self.size, self.size), (128, 128, 128))
            pixels = np.asarray(base.convert("RGB"), dtype=np.float32)
            mixed = (1 - self.amount) * pixels + self.amount * mean
            out.append({"key": item["key"], "image": Image.fromarray(mixed.round().astype(np.uint8), "RGB"),
                        "meta": {"operator": self.name, "amount": self.amount}})
        return out


class Hold:
    """Stands in for a GPU model: holds each batch for ``params.seconds`` without using the CPU (a sleep, as a
    process waiting on its device does), then returns the style image resized to ``params.size``."""

    name = "hold"

    def __init__(self, model: str | None = None, params: dict[str, Any] | None = None, device: str = "cpu"):
        self.seconds = float((params or {}).get("seconds", 1.0))
        self.size = int((params or {}).get("size", 64))

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        time.sleep(self.seconds)
        return [{"key": item["key"], "image": item["style"].convert("RGB").resize((self.size, self.size)),
                 "meta": {"operator": self.name}} for item in items]


def _styled(items: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The style image, with how many items the call that made it had (``meta.call_items``)."""
    return [{"key": item["key"], "image": item["style"].convert("RGB").resize((32, 32)),
             "meta": {"operator": name, "call_items": len(items)}} for item in items]


class OomAbove:
    """Out of GPU memory (``torch.cuda.OutOfMemoryError``) for a call of more than ``params.max_items`` items;
    ``calls`` records the size of every call."""

    name = "oom-above"

    def __init__(self, model: str | None = None, params: dict[str, Any] | None = None, device: str = "cpu"):
        self.max_items = int((params or {}).get("max_items", 2))
        self.calls: list[int] = []

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import torch

        self.calls.append(len(items))
        if len(items) > self.max_items:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(items)} GiB")
        return _styled(items, self.name)


ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"
PROCESS_CALLS = 0  # calls made in this process: a fresh process (a restarted actor) starts again at 0


class PoisonAfterFirst:
    """A device poisoned by its first call: every later call in the same process fails with CUDA's
    illegal-memory-access error (``params.from_call``: the first call that fails, default 2; 1: every call)."""

    name = "poison-after-first"

    def __init__(self, model: str | None = None, params: dict[str, Any] | None = None, device: str = "cpu"):
        self.from_call = int((params or {}).get("from_call", 2))

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        global PROCESS_CALLS
        PROCESS_CALLS += 1
        if PROCESS_CALLS >= self.from_call:
            raise RuntimeError(f"{ILLEGAL_ACCESS}\nCUDA kernel errors might be asynchronously reported at some "
                               "other API call, so the stacktrace below might be incorrect.")
        return _styled(items, self.name)


class FailAll:
    """Every sample fails with one reason (``params.reason``, default "weights file corrupt")."""

    name = "fail-all"

    def __init__(self, model: str | None = None, params: dict[str, Any] | None = None, device: str = "cpu"):
        self.reason = str((params or {}).get("reason", "weights file corrupt"))
        self.calls = 0

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.calls += 1
        raise RuntimeError(self.reason)


class TimedHold(Hold):
    """A :class:`Hold` (or, with ``params.operator``, a real operator config wrapped on the actor's device) that
    records each call's start and end (``time.time()``) and thread in every result's ``meta``: a benchmark reads each
    actor's busy intervals back from the index's ``meta`` column, with no side channel."""

    name = "timed-hold"

    def __init__(self, model: str | None = None, params: dict[str, Any] | None = None, device: str = "cpu"):
        params = dict(params or {})
        inner = params.pop("operator", None)
        super().__init__(model, params, device)
        self.inner = None
        if inner is not None:
            from operators import build_operator

            self.inner = build_operator(inner, device=device)

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        start = time.time()
        results = self.inner(items) if self.inner is not None else super().__call__(items)
        end = time.time()
        for result in results:
            result["meta"] = {**(result.get("meta") or {}), "call_start": start, "call_end": end,
                              "thread": threading.get_ident()}
        return results


def readme_plugin(folder, output: str, samples) -> dict:
    """Write the README's "Your own operator" example as the package ``my_ops`` under ``folder`` and return its
    config (the README's YAML, with ``py_modules`` made absolute), so tests run exactly what users copy."""
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Your own operator"):readme.index("## Benchmarks")]
    package = Path(folder) / "my_ops"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "styles.py").write_text(re.findall(r"```python\n(.*?)```", section, re.S)[0])
    config = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", section, re.S)[0])
    assert config["ray"]["runtime_env"]["py_modules"] == ["./my_ops"], config
    config["ray"]["runtime_env"]["py_modules"] = [str(package)]
    return {**config, "output": {"path": output, "samples_per_shard": 2},
            "content": {"images": str(samples / "content"), "prompts": str(samples / "prompts.txt")},
            "style": {"images": str(samples / "style")}, "pairing": {"limit": 6, "seed": 5},
            "decode": {"max_side": 64}, "scoring": {"clip_model": "tiny:clip"}}
