"""Model loading: a hub id, a local ``save_pretrained`` directory, or ``tiny:<kind>``.

``tiny:<kind>`` builds a random-weight model of the real architecture family offline, saves it with
safetensors into a cache directory, and then loads it through the same path as real weights, so the
loading code is exercised by every test.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

TINY_PREFIX = "tiny:"

# kind -> "module:function"; function(out_dir: Path, seed: int = 0, **size) writes the model to out_dir.
TINY_BUILDERS: dict[str, str] = {
    "clip": "operators.clip_score:save_tiny_clip",
    "sd15": "operators.tiny_sd:save_tiny_sd15",
    "sdxl": "operators.tiny_sd:save_tiny_sdxl",
    "flux-fill": "operators.tiny_flux:save_tiny_flux_fill",
}

# Bump when a tiny builder changes, so cached tiny models are rebuilt.
TINY_VERSION = "1"


def tiny_kinds() -> list[str]:
    return sorted(TINY_BUILDERS)


def save_tiny(kind: str, out_dir: str | os.PathLike, seed: int = 0, **size) -> Path:
    """Write the tiny random-weight model ``kind`` to ``out_dir`` and return the directory."""
    if kind not in TINY_BUILDERS:
        raise ValueError(f"unknown tiny model kind {kind!r}; known: {', '.join(tiny_kinds())}")
    module_name, fn_name = TINY_BUILDERS[kind].split(":")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    getattr(importlib.import_module(module_name), fn_name)(out, seed=seed, **size)
    return out


def tiny_cache_dir() -> Path:
    root = os.environ.get("STYLEGEN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stylegen")
    return Path(root) / "tiny"


def resolve_model(spec: str) -> str:
    """Return a loadable location for ``spec``: a local directory, or the hub id unchanged.

    ``tiny:<kind>`` (optionally ``tiny:<kind>@<seed>``) is built once into the cache and reused; the build
    goes to a temporary directory first and is renamed into place, so concurrent actors never see half a model.
    """
    if not spec.startswith(TINY_PREFIX):
        return spec
    kind, _, seed = spec[len(TINY_PREFIX):].partition("@")
    seed_value = int(seed) if seed else 0
    target = tiny_cache_dir() / f"{kind}-s{seed_value}-v{TINY_VERSION}"
    if target.is_dir():
        return str(target)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    save_tiny(kind, tmp, seed=seed_value)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
