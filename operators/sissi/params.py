"""The sissi operator's params: defaults, accepted values, and :func:`parse_params`, which validates them.

Why a module of its own: a config is checked against these before any actor starts (``check_params``), and the
names here (``MODES``, ``COMPOSES``, ...) are the vocabulary the other modules validate against. It imports
neither torch nor diffusers itself (diffusers only to check an ``attention_backend``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL = "black-forest-labs/FLUX.1-Fill-dev"
MODES = ("off", "vanilla", "printed", "fixed", "dynamic", "lse_ratio", "dynamic_norm")
TEXT_TOKENS = ("all", "prompt")
CACHES = ("off", "first_block")
COMPOSES = ("mass_preserving", "replace", "self_inclusive")
PROMPT_TEMPLATES = {
    "plain": "{prompt}",
    "diptych": (
        "A diptych with two side-by-side images in the same artistic style. On the left is a reference "
        "artwork; on the right, {prompt}, in the same style."
    ),
}


@dataclass
class DSSIConfig:
    """Where and how DSSI applies (docs/research/sissi.md §4, §9)."""

    mode: str = "dynamic_norm"  # count-invariant reading; unverified on real weights (README)
    compose: str = "mass_preserving"
    lam: float = 0.5
    layers: str | list[int] = "all"  # all | double | single | global indices (double-stream blocks first)
    steps: tuple[float, float] = (0.0, 1.0)  # step i is gated in when start <= i/steps < end
    record: bool = False  # put branch masses and lambda per item into meta (costs a sync per layer)
    text_tokens: str = "all"  # all | prompt: leave T5 padding out of the DSSI rows' text branch


@dataclass
class SissiParams:
    panel_size: tuple[int, int] = (512, 512)  # (width, height) of each panel
    steps: int = 50
    guidance: float = 30.0
    max_sequence_length: int = 512
    prompt_template: str = "plain"
    dtype: str | None = None  # default: bfloat16 on CUDA, float32 elsewhere
    offload: bool = False  # enable_model_cpu_offload (accelerators only)
    vae_tiling: bool = False
    compile: bool = False  # regional torch.compile of the repeated transformer blocks
    cache: str = "off"  # off | first_block: diffusers' First Block Cache on the transformer (approximate)
    cache_threshold: float = 0.05  # FirstBlockCacheConfig.threshold
    attention_backend: str | None = None  # a diffusers attention backend for the stock rows and layers
    dssi: DSSIConfig = field(default_factory=DSSIConfig)


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be a boolean, got {value!r}")


def _parse_layers(value: Any) -> str | list[int]:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("all", "double", "single"):
            return text
        value = [part for part in text.replace(",", " ").split() if part]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        layers = [int(x) for x in value]
    except (TypeError, ValueError):
        raise ValueError(f"dssi.layers must be all|double|single or a list of layer indices, got {value!r}") from None
    if not layers:
        raise ValueError("dssi.layers is empty; use dssi.mode: off to disable DSSI")
    return layers


def _parse_steps(value: Any) -> tuple[float, float]:
    if isinstance(value, str):
        value = value.replace(":", ",").replace("-", ",").split(",")
    try:
        lo, hi = (float(x) for x in value)
    except (TypeError, ValueError):
        raise ValueError(f"dssi.steps must be a [start, end] fraction range, got {value!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"dssi.steps must satisfy 0 <= start < end <= 1, got {value!r}")
    return lo, hi


def _parse_panel(value: Any) -> tuple[int, int]:
    if isinstance(value, int | str) and not isinstance(value, bool):
        width = height = int(value)
    else:
        width, height = (int(x) for x in value)
    if width <= 0 or height <= 0:
        raise ValueError(f"panel_size must be positive, got {value!r}")
    return width, height


def _check_backend(name: str) -> None:
    """A diffusers ``AttentionBackendName`` value (imported only when a backend is asked for)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = sorted(b.value for b in AttentionBackendName)
    if name not in known:
        raise ValueError(f"attention_backend must be one of {', '.join(known)}, got {name!r}")


def parse_params(params: dict[str, Any] | None) -> SissiParams:
    """Validate operator params; nested ``{"dssi": {...}}`` and dotted ``"dssi.mode"`` keys are equivalent."""
    flat = _flatten(dict(params or {}))
    out = SissiParams()
    d = out.dssi
    setters = {
        "panel_size": lambda v: setattr(out, "panel_size", _parse_panel(v)),
        "steps": lambda v: setattr(out, "steps", int(v)),
        "guidance": lambda v: setattr(out, "guidance", float(v)),
        "max_sequence_length": lambda v: setattr(out, "max_sequence_length", int(v)),
        "prompt_template": lambda v: setattr(out, "prompt_template", str(v)),
        "dtype": lambda v: setattr(out, "dtype", None if v is None else str(v)),
        "offload": lambda v: setattr(out, "offload", _as_bool(v, "offload")),
        "vae_tiling": lambda v: setattr(out, "vae_tiling", _as_bool(v, "vae_tiling")),
        "compile": lambda v: setattr(out, "compile", _as_bool(v, "compile")),
        "cache": lambda v: setattr(out, "cache", "off" if v in (None, False) else str(v).lower()),
        "cache_threshold": lambda v: setattr(out, "cache_threshold", float(v)),
        "attention_backend": lambda v: setattr(out, "attention_backend", None if v is None else str(v).lower()),
        "dssi.mode": lambda v: setattr(d, "mode", str(v).lower()),
        "dssi.compose": lambda v: setattr(d, "compose", str(v).lower()),
        "dssi.lam": lambda v: setattr(d, "lam", float(v)),
        "dssi.layers": lambda v: setattr(d, "layers", _parse_layers(v)),
        "dssi.steps": lambda v: setattr(d, "steps", _parse_steps(v)),
        "dssi.record": lambda v: setattr(d, "record", _as_bool(v, "dssi.record")),
        "dssi.text_tokens": lambda v: setattr(d, "text_tokens", str(v).lower()),
    }
    unknown = sorted(set(flat) - set(setters))
    if unknown:
        raise ValueError(f"unknown sissi params: {', '.join(unknown)}; known: {', '.join(sorted(setters))}")
    for key, value in flat.items():
        try:
            setters[key](value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"invalid sissi param {key}={value!r}: {err}") from None
    if d.mode not in MODES:
        raise ValueError(f"dssi.mode must be one of {', '.join(MODES)}, got {d.mode!r}")
    if d.compose not in COMPOSES:
        raise ValueError(f"dssi.compose must be one of {', '.join(COMPOSES)}, got {d.compose!r}")
    if d.text_tokens not in TEXT_TOKENS:
        raise ValueError(f"dssi.text_tokens must be one of {', '.join(TEXT_TOKENS)}, got {d.text_tokens!r}")
    if out.cache not in CACHES:
        raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {out.cache!r}")
    if not out.cache_threshold > 0:
        raise ValueError(f"cache_threshold must be > 0, got {out.cache_threshold}")
    if out.attention_backend is not None:
        _check_backend(out.attention_backend)
    if not 0.0 <= d.lam <= 1.0:
        raise ValueError(f"dssi.lam must be in [0, 1], got {d.lam}")
    if out.steps < 1 or out.max_sequence_length < 1:
        raise ValueError("steps and max_sequence_length must be >= 1")
    template = PROMPT_TEMPLATES.get(out.prompt_template, out.prompt_template)
    if "{prompt}" not in template:
        raise ValueError("prompt_template must be plain, diptych or a string containing {prompt}")
    if out.dtype is not None and out.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {out.dtype!r}")
    return out

