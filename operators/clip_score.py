"""CLIP scores with open_clip: content = cos(text(prompt), image(output)), style = cos(image(style),
image(output)); embeddings are L2-normalised. Style embeddings are cached by style id because a corpus
reuses a few thousand style references across millions of outputs.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch
from PIL import Image

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_SEED = 0  # the seed of a randomly initialised CLIP (no pretrained weights)

# A real open_clip CLIP (vision transformer + text transformer, bundled BPE tokenizer) with tiny widths:
# scores are meaningless, but every code path of real CLIP scoring runs.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_tiny_clip(out_dir: Path, seed: int = 0, **size) -> Path:
    """Write a random-weight open_clip model loadable as ``local-dir:<out_dir>``."""
    import open_clip
    from safetensors.torch import save_file

    cfg = json.loads(json.dumps(TINY_CLIP_CONFIG))
    cfg.update(size)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preprocess = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    (out_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "open_clip_model.safetensors"))
    return out_dir


def resolve_clip(model: str, pretrained: str) -> tuple[str, str | None, bool]:
    """Map config values to open_clip arguments: ``(model_name, pretrained, meaningful)``.

    ``tiny:clip`` and local directories load through open_clip's ``local-dir:`` schema; ``none`` means
    random weights; a file path or an open_clip tag loads real weights.
    """
    from operators.models import resolve_model

    if model.startswith("tiny:"):
        return f"local-dir:{resolve_model(model)}", None, False
    if os.path.isdir(model):
        return f"local-dir:{os.path.abspath(model)}", None, True
    if pretrained in ("none", "", None):
        return model, None, False
    return model, pretrained, True


def simple_tokenizer():
    """open_clip's CLIP BPE tokenizer (``SimpleTokenizer``, its bundled vocabulary), loaded from its own file.

    The stylize actor needs it only to count a prompt's tokens, and ``import open_clip.tokenizer`` first runs the
    package's ``__init__``, which imports torchvision's models, torch._dynamo and transformers: 4-6 s of every
    actor's start-up (17 s on a busy 2-core machine). ``tokenizer.py`` imports no other open_clip module, so it is
    executed alone here (by hand: open_clip has no lighter entry point); should a later open_clip change that, the
    package import is the fallback."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("open_clip")
        source = os.path.join(spec.submodule_search_locations[0], "tokenizer.py")
        loaded = importlib.util.spec_from_file_location("stylegen_open_clip_tokenizer", source)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
        return module.SimpleTokenizer()
    except Exception as exc:  # any failure of the shortcut falls back to the package
        log.debug("open_clip's tokenizer file did not load alone (%s); importing the package", exc)
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer()


class ClipScorer:
    """Batched open_clip scoring with a bounded cache of style embeddings."""

    def __init__(self, model: str = "ViT-B-32", pretrained: str = "none", device: str | None = None,
                 style_cache_size: int = 4096):
        import open_clip

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        name, weights, self.meaningful = resolve_clip(model, pretrained)
        # Random weights (``clip_pretrained: none``) are drawn from a fixed seed, so every scoring actor of a run,
        # and every run, holds the same model and gives a sample the same (meaningless) scores.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                name, pretrained=weights, device=self.device, weights_only=True
            )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self._style_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._style_cache_size = style_cache_size

    @property
    def embed_dim(self) -> int:
        """Size of the image embedding (what a quality head takes)."""
        dim = getattr(self.model.visual, "output_dim", None)
        if dim is None:
            dim = int(self.embed_images([Image.new("RGB", (8, 8))]).shape[-1])
        return int(dim)

    def _autocast(self):
        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        if not images:
            return torch.empty(0)
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        with self._autocast():
            emb = self.model.encode_image(pixels)
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.empty(0)
        tokens = self.tokenizer(texts).to(self.device)
        with self._autocast():
            emb = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def style_embeddings(self, styles: list[tuple[str, Image.Image]]) -> torch.Tensor:
        """Embeddings for ``(style_id, image)`` pairs, computing only the ones not cached."""
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, Image.Image] = {}
        for sid, im in styles:
            if sid in found or sid in missing:
                continue
            if sid in self._style_cache:
                self._style_cache.move_to_end(sid)
                found[sid] = self._style_cache[sid]
            else:
                missing[sid] = im
        if missing:
            for sid, emb in zip(missing, self.embed_images(list(missing.values())), strict=True):
                found[sid] = self._style_cache[sid] = emb
            while len(self._style_cache) > self._style_cache_size:
                self._style_cache.popitem(last=False)
        return torch.stack([found[sid] for sid, _ in styles])

    def score(
        self,
        outputs: list[Image.Image],
        prompts: list[str | None],
        styles: list[tuple[str, Image.Image]],
    ) -> tuple[list[float | None], list[float]]:
        """Content scores (None where there is no prompt) and style scores, one per output."""
        if not outputs:
            return [], []
        return self.score_embedded(self.embed_images(outputs), prompts, styles)

    def score_embedded(
        self,
        out_emb: torch.Tensor,
        prompts: list[str | None],
        styles: list[tuple[str, Image.Image]],
    ) -> tuple[list[float | None], list[float]]:
        """:meth:`score` from the outputs' image embeddings (which the quality heads reuse)."""
        if len(out_emb) == 0:
            return [], []
        style_scores = (out_emb * self.style_embeddings(styles)).sum(-1).tolist()
        content: list[float | None] = [None] * len(out_emb)
        with_prompt = [i for i, p in enumerate(prompts) if p and p.strip()]
        if with_prompt:
            text_emb = self.embed_texts([prompts[i] for i in with_prompt])
            for i, s in zip(with_prompt, (out_emb[with_prompt] * text_emb).sum(-1).tolist(), strict=True):
                content[i] = s
        return content, style_scores
