"""Model loading: a hub id, a local ``save_pretrained`` directory, or ``tiny:<kind>``.

``tiny:<kind>`` builds a random-weight model of the real architecture family offline, saves it with
safetensors into a cache directory, and then loads it through the same path as real weights, so the
loading code is exercised by every test.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

TINY_PREFIX = "tiny:"

# kind -> "module:function"; function(out_dir: Path, seed: int = 0, **size) writes the model to out_dir.
TINY_BUILDERS: dict[str, str] = {
    "clip": "operators.clip_score:save_tiny_clip",
    "sd15": "operators.tiny_sd:save_tiny_sd15",
    "sdxl": "operators.tiny_sd:save_tiny_sdxl",
    "flux-fill": "operators.tiny_flux:save_tiny_flux_fill",
    "flux": "operators.tiny_flux:save_tiny_flux",
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


# Which tiny kinds each operator can load (anything else fails in the actor, long after start-up).
OPERATOR_TINY_KINDS: dict[str, tuple[str, ...]] = {
    "sissi": ("flux-fill",),
    "ad-t2i": ("sd15", "sdxl", "flux"),
    "ad-transfer": ("sd15", "sdxl"),
    "ad-texture": ("sd15", "sdxl"),
}
# A Hugging Face repo id: "name" or "org/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_local(spec: str) -> bool:
    """Whether a spec is meant as a local path (absolute, ``./``, ``../``, ``~``) rather than a hub id."""
    return os.path.isabs(spec) or spec.startswith(("./", "../", "~", ".\\", "..\\")) or os.path.exists(spec)


def check_model_spec(spec: str, kinds: tuple[str, ...] | None = None) -> None:
    """Raise ValueError for a model spec that can never load, so the CLI refuses it at start-up instead of
    every actor failing later: an unknown ``tiny:`` kind (or one of the wrong family, ``kinds``), a local
    directory that does not exist, or a string that is not a hub id. Whether a hub id exists is not checked
    (that needs the network)."""
    if spec.startswith(TINY_PREFIX):
        kind, _, seed = spec[len(TINY_PREFIX):].partition("@")
        allowed = kinds or tuple(tiny_kinds())
        if kind not in allowed:
            raise ValueError(f"unknown model {spec!r}; tiny models here: {', '.join(TINY_PREFIX + k for k in allowed)}")
        if seed and not seed.isdigit():
            raise ValueError(f"model {spec!r}: the seed after '@' must be a whole number")
        return
    if looks_local(spec):
        if not os.path.isdir(os.path.expanduser(spec)):
            raise ValueError(f"model directory not found: {spec}")
        return
    if not _HUB_ID.match(spec):
        raise ValueError(f"model {spec!r} is neither tiny:<kind>, an existing directory nor a hub id (org/name)")
