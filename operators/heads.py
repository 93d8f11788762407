"""Quality heads: small linear/MLP models on the CLIP image embedding (no second image forward).

The two published heads curation pipelines use (NeMo Curator, LAION) have fixed layouts:

- ``aesthetic``: the LAION improved aesthetic predictor, an MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 without
  activations (its dropouts do nothing at inference) on L2-normalised ViT-L/14 image embeddings; score ~1-10.
- ``nsfw``: LAION's CLIP-based NSFW detector as NeMo Curator ports it: a standardisation (``mean``,
  ``variance``), then 768 -> 64 -> 512 -> 256 -> 1 with ReLUs and a sigmoid; probability 0-1.

Any other linear or MLP head is a safetensors file with a small JSON config (:class:`HeadSpec`), either in the
file's metadata (key ``stylegen_head``, what :func:`convert_head` writes) or next to it (``NAME.json``).
``tiny`` builds a random head of a layout for the embedding size at hand, offline, for tests.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

METADATA_KEY = "stylegen_head"
Layout = Literal["aesthetic", "nsfw", "linear"]
LAYOUTS: dict[str, dict] = {
    "aesthetic": {"layers": [1024, 128, 64, 16, 1], "activation": "none", "output": "identity", "standardize": False},
    "nsfw": {"layers": [64, 512, 256, 1], "activation": "relu", "output": "sigmoid", "standardize": True},
    "linear": {"layers": [1], "activation": "none", "output": "identity", "standardize": False},
}


class HeadError(ValueError):
    """A head that cannot be built or loaded; the message names the file and what is wrong."""


@dataclass(frozen=True)
class HeadSpec:
    """The JSON config of a head: sizes of the linear layers after the input, the activation between them, the
    output function, and whether an input standardisation (``norm.mean``, ``norm.variance``) comes first."""

    input_dim: int
    layers: tuple[int, ...]
    activation: Literal["none", "relu", "gelu"] = "none"
    output: Literal["identity", "sigmoid"] = "identity"
    standardize: bool = False

    @classmethod
    def from_json(cls, data: dict, where: str) -> HeadSpec:
        try:
            spec = cls(int(data["input_dim"]), tuple(int(n) for n in data["layers"]),
                       data.get("activation", "none"), data.get("output", "identity"), bool(data.get("standardize")))
        except (KeyError, TypeError, ValueError) as exc:
            raise HeadError(f"{where}: bad head config ({exc.__class__.__name__}: {exc})") from None
        if spec.activation not in ("none", "relu", "gelu") or spec.output not in ("identity", "sigmoid"):
            raise HeadError(f"{where}: activation must be none|relu|gelu and output identity|sigmoid")
        if not spec.layers or spec.layers[-1] != 1 or min(spec.layers) < 1:
            raise HeadError(f"{where}: layers must end in 1 (one score per image)")
        return spec

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class Head(torch.nn.Module):
    """One score per L2-normalised embedding row."""

    def __init__(self, spec: HeadSpec):
        super().__init__()
        self.spec = spec
        sizes = [spec.input_dim, *spec.layers]
        self.linear = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False))
        if spec.standardize:
            self.norm = torch.nn.Module()
            self.norm.register_buffer("mean", torch.zeros(spec.input_dim))
            self.norm.register_buffer("variance", torch.ones(spec.input_dim))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(emb.to(self.linear[0].weight.dtype), dim=-1)
        if self.spec.standardize:
            x = (x - self.norm.mean) / self.norm.variance.sqrt()
        act = {"none": None, "relu": torch.relu, "gelu": torch.nn.functional.gelu}[self.spec.activation]
        for i, layer in enumerate(self.linear):
            x = layer(x)
            if act is not None and i < len(self.linear) - 1:
                x = act(x)
        if self.spec.output == "sigmoid":
            x = torch.sigmoid(x)
        return x.squeeze(-1)


def layout_spec(layout: str, input_dim: int) -> HeadSpec:
    if layout not in LAYOUTS:
        raise HeadError(f"unknown head layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return HeadSpec.from_json({"input_dim": input_dim, **LAYOUTS[layout]}, layout)


def default_layout(name: str) -> str:
    """A head named ``aesthetic`` or ``nsfw`` has that layout unless its config says otherwise."""
    return name if name in ("aesthetic", "nsfw") else "linear"


def tiny_head(layout: str, input_dim: int, seed: int = 0) -> Head:
    """A random head of ``layout`` (weights from a seeded generator): finite scores in the layout's range."""
    head = Head(layout_spec(layout, input_dim))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in head.linear:
            fan_in = layer.weight.shape[1]
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * (1.5 / fan_in**0.5))
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * 0.1)
        if layout == "aesthetic":
            head.linear[-1].bias.add_(5.5)  # the published head's scores sit around 4-7
        if head.spec.standardize:
            head.norm.mean.copy_(torch.randn(input_dim, generator=gen) * 0.1 / input_dim**0.5)
            head.norm.variance.copy_((torch.rand(input_dim, generator=gen) + 0.5) / input_dim)
    return head.eval()


def name_seed(name: str) -> int:
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)


def load_head(weights: str, input_dim: int | None = None) -> Head:
    """A head from a safetensors file and its JSON config (metadata ``stylegen_head`` or ``<stem>.json``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(weights).expanduser()
    if not path.is_file():
        raise HeadError(f"{weights}: head weights file not found")
    if path.suffix != ".safetensors":
        raise HeadError(f"{weights}: heads load from .safetensors only; convert a .pth state dict with "
                        "`stylegen models convert-head IN OUT.safetensors`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(METADATA_KEY)
        state = load_file(str(path))
    except Exception as exc:
        raise HeadError(f"{weights}: unreadable safetensors ({exc.__class__.__name__}: {exc})") from None
    sidecar = path.with_suffix(".json")
    if meta is None and sidecar.is_file():
        meta = sidecar.read_text(encoding="utf-8")
    if meta is None:
        raise HeadError(f"{weights}: no head config (metadata {METADATA_KEY!r} or {sidecar.name})")
    try:
        spec = HeadSpec.from_json(json.loads(meta), weights)
    except json.JSONDecodeError:
        raise HeadError(f"{weights}: head config is not JSON") from None
    if input_dim is not None and spec.input_dim != input_dim:
        raise HeadError(f"{weights}: the head takes {spec.input_dim}-d embeddings, the CLIP model gives {input_dim}-d")
    head = Head(spec)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise HeadError(f"{weights}: weights do not match the head config ({str(exc).splitlines()[0]})") from None
    return head.eval()


def build_head(name: str, weights: str, input_dim: int, layout: str | None = None) -> Head:
    """``weights: tiny`` builds a random head (layout from ``layout`` or the name); else :func:`load_head`."""
    if weights == "tiny":
        return tiny_head(layout or default_layout(name), input_dim, seed=name_seed(name))
    return load_head(weights, input_dim)


def save_head(head: Head, out: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(out), metadata={METADATA_KEY: head.spec.to_json()})
    return out


# ---- published state dicts ---------------------------------------------------------------------------------
def _natural(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key))


def convert_state(state: dict[str, torch.Tensor], layout: str = "auto", activation: str | None = None,
                  output: str | None = None) -> Head:
    """A head from a published state dict: its 2-D ``*.weight`` tensors are the linear layers in natural key
    order (``layers.0``, ``layers.2`` ... or ``linear_1`` ...), ``*mean``/``*variance`` an input standardisation.
    ``auto`` takes the activation and output of the known layout the shapes match (else ``linear``'s)."""
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    weights = sorted((k for k, v in state.items() if k.rsplit(".", 1)[-1] == "weight" and v.ndim == 2), key=_natural)
    if not weights:
        raise HeadError("no linear layer (2-D '*.weight' tensor) in the state dict")
    bases = [k[: -len("weight")] for k in weights]
    mean = next((k for k in state if k.rsplit(".", 1)[-1] == "mean"), None)
    variance = next((k for k in state if k.rsplit(".", 1)[-1] == "variance"), None)
    used = set(weights) | {f"{b}bias" for b in bases} | {k for k in (mean, variance) if k}
    extra = sorted(set(state) - used)
    if extra:
        raise HeadError(f"not a linear/MLP head: unexpected tensors {', '.join(extra[:5])}")
    sizes = [state[weights[0]].shape[1]] + [state[w].shape[0] for w in weights]
    for a, b in zip(weights, weights[1:], strict=False):
        if state[b].shape[1] != state[a].shape[0]:
            raise HeadError(f"{b} takes {state[b].shape[1]} inputs but {a} gives {state[a].shape[0]}")
    if layout == "auto":
        layout = next((n for n, spec in LAYOUTS.items() if spec["layers"] == sizes[1:]
                       and spec["standardize"] == bool(mean)), "linear")
    base = dict(LAYOUTS[layout]) if layout in LAYOUTS else layout_spec(layout, 1)  # unknown layout: the error
    spec = HeadSpec.from_json({"input_dim": sizes[0], "layers": sizes[1:], "standardize": bool(mean and variance),
                               "activation": activation or base["activation"], "output": output or base["output"]},
                              "state dict")
    head = Head(spec)
    new = {}
    for i, b in enumerate(bases):
        new[f"linear.{i}.weight"] = state[f"{b}weight"]
        new[f"linear.{i}.bias"] = state.get(f"{b}bias", torch.zeros(state[f"{b}weight"].shape[0]))
    if spec.standardize:
        new["norm.mean"], new["norm.variance"] = state[mean].reshape(-1), state[variance].reshape(-1)
    head.load_state_dict({k: v.float() for k, v in new.items()}, strict=True)
    return head.eval()


def convert_head(src: str | Path, out: str | Path, layout: str = "auto", activation: str | None = None,
                 output: str | None = None) -> Head:
    """``.pth`` state dict -> safetensors head. Loaded with ``weights_only=True``: tensors only, never code."""
    try:
        state = torch.load(str(src), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise HeadError(f"{src}: not found") from None
    except Exception as exc:  # an UnpicklingError for anything that is not plain tensors
        raise HeadError(f"{src}: not a plain state dict ({exc.__class__.__name__}: "
                        f"{str(exc).strip().splitlines()[0][:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise HeadError(f"{src}: not a state dict (a {type(state).__name__})")
    try:
        head = convert_state(state, layout, activation, output)
    except HeadError as exc:
        raise HeadError(f"{src}: {exc}") from None
    save_head(head, out)
    return head


class HeadSet:
    """The configured heads of a scoring pass: ``{name: scores}`` for a batch of image embeddings.

    Computed in float64 and rounded to float32, so a row's score does not depend on which rows share its batch
    (float32 matmuls differ in the last bits with the batch's size): ``filter``'s one-worker and staged paths
    decide the same."""

    def __init__(self, heads: dict[str, dict], input_dim: int, device: str = "cpu"):
        self.device = device
        self.heads = {name: build_head(name, h["weights"], input_dim, h.get("layout")).to(device, torch.float64)
                      for name, h in sorted(heads.items())}

    def __bool__(self) -> bool:
        return bool(self.heads)

    @torch.inference_mode()
    def __call__(self, emb: torch.Tensor) -> dict[str, list[float]]:
        if not self.heads or len(emb) == 0:
            return {name: [] for name in self.heads}
        emb = emb.to(self.device, torch.float64)
        return {name: head(emb).float().cpu().tolist() for name, head in self.heads.items()}

    def rows(self, emb: torch.Tensor) -> list[dict[str, float]]:
        """One ``{name: score}`` per embedding row."""
        scores = self(emb)
        return [{name: scores[name][i] for name in self.heads} for i in range(len(emb))]
