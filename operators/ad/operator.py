"""The AD operators of the registry: ``ad-t2i``, ``ad-transfer``, ``ad-texture`` (docs/architecture.md §6 contract).

Each parses and checks its params once (tables in :mod:`operators.ad.params`), loads its model once, and turns
an item into one result: the image(s) and the run's settings and losses as metadata.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from PIL import Image

from operators.ad.flux import flux_ad_sample, flux_kind, load_flux_model
from operators.ad.images import pil_to_tensor, tensor_to_pil
from operators.ad.masks import LabelMasks, read_labels
from operators.ad.model import DTYPES, is_sdxl, load_ad_model
from operators.ad.params import APPLIES, COMMON, DEFAULTS, FLUX_DEFAULTS, FLUX_LAST_CALLS, FLUX_PARAMS, XL_T2I
from operators.ad.sd import ADConfig, ADRun, optimize, sample
from operators.ad.textures import circular_padding, panorama


class _ADOperator:
    """Shared operator plumbing: parse params once, load the model once, one result dict per item.

    Params (defaults per operator and method in ``DEFAULTS``): ``method``, ``steps``, ``lr``, ``iters``,
    ``content_weight``, ``layers`` ([start, end) self-attention indices in execution order; default the last
    six), ``size`` (int or [width, height]; default the model's native size, 2x wide for panorama),
    ``num_images``, ``precision`` (fp32 = reference mode; bf16 = fast mode, default on CUDA). Advanced:
    ``fast`` (fast code path in any precision), ``feature_chunk``, ``gradient_checkpointing`` (default on for
    SDXL in fast mode), ``attn_scale``. Style images are resized to the native square size, content to ``size``.
    """

    name = "ad"
    kind = "t2i"
    methods: tuple[str, ...] = ("sample",)

    @classmethod
    def check_params(cls, params: dict[str, Any] | None) -> None:
        """Refuse, without loading anything, a param that is unknown or that this operator and method would
        ignore (one line naming it)."""
        params = dict(params or {})
        method = params.get("method", cls.methods[0])
        if method not in cls.methods:
            raise ValueError(f"{cls.name}: method must be one of {list(cls.methods)}, got {method!r}")
        known = COMMON | {p for p, where in APPLIES.items() if any(kind == cls.kind for kind, _ in where)}
        for param in sorted(params):
            if param not in known:
                raise ValueError(f"{cls.name}: unknown param {param!r}; known: {', '.join(sorted(known))}")
            if param in APPLIES and (cls.kind, method) not in APPLIES[param]:
                raise ValueError(f"{cls.name}: param {param!r} does not apply to method {method!r}")
        if ("source_mask" in params) != ("target_mask" in params):
            raise ValueError(f"{cls.name}: params 'source_mask' and 'target_mask' go together (label images of "
                             "the style and of the output)")
        fast = params.get("fast")
        if "feature_chunk" in params and (fast is False or (fast is None and params.get("precision") == "fp32")):
            raise ValueError(f"{cls.name}: param 'feature_chunk' applies to the fast mode only (fast: true, or a "
                             "precision other than fp32)")

    def __init__(self, model: str, params: dict[str, Any] | None = None, device: str = "cpu") -> None:
        params = dict(params or {})
        self.check_params(params)
        method = params.get("method", self.methods[0])
        precision = params.get("precision") or ("bf16" if str(device).startswith("cuda") else "fp32")
        fast = bool(params.get("fast", precision != "fp32"))
        self.model_spec = model
        checkpointing = bool(params.get("gradient_checkpointing", fast and is_sdxl(model)))
        self.model = load_ad_model(model, device, precision, checkpointing)
        settings = dict(DEFAULTS[(self.kind, method)])
        if self.kind == "t2i" and self.model.is_xl:
            settings.update(XL_T2I)
        settings.update({k: v for k, v in params.items() if v is not None})
        settings.update(method=method, precision=precision, fast=fast, gradient_checkpointing=checkpointing)
        settings["layers"] = self._layers(params.get("layers"))
        settings["size"] = self._size(params.get("size"), method)
        settings["num_images"] = int(params.get("num_images", 1))
        if settings["num_images"] < 1:
            raise ValueError(f"{self.name}: num_images must be >= 1")
        self.settings = settings

    def _layers(self, layers: Any) -> tuple[int, int]:
        n = self.model.tap.num_self_layers
        if layers is None:
            return self.model.default_layers()
        start, end = (int(v) for v in layers)
        if not 0 <= start < end <= n:
            raise ValueError(f"{self.name}: layers must be a range [start, end) within [0, {n}], got {layers}")
        return (start, end)

    def _size(self, size: Any, method: str) -> tuple[int, int]:
        native = self.model.native_size
        if size is None:
            width, height = (2 * native, native) if method == "panorama" else (native, native)
        elif isinstance(size, int):
            width = height = size
        else:
            width, height = (int(v) for v in size)
        multiple = self.model.size_multiple
        if width % multiple or height % multiple or width <= 0 or height <= 0:
            raise ValueError(f"{self.name}: size {width}x{height} must be positive multiples of {multiple}")
        return (width, height)

    def config(self) -> ADConfig:
        s = self.settings
        return ADConfig(layers=s["layers"], lr=float(s["lr"]), iters=int(s["iters"]), steps=int(s["steps"]),
                        content_weight=float(s.get("content_weight", 0.0)),
                        attn_scale=float(s.get("attn_scale", 1.0)), fast=s["fast"],
                        feature_chunk=int(s.get("feature_chunk", 8)))

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self._one(item) for item in items]

    def _styles(self, item: dict[str, Any]) -> list[Image.Image]:
        style = item.get("style")
        styles = [s for s in (style if isinstance(style, list | tuple) else [style]) if s is not None]
        return styles

    def _one(self, item: dict[str, Any]) -> dict[str, Any]:
        key = item.get("key")
        styles = self._styles(item)
        if not styles:
            return {"key": key, "error": f"{self.name}: no style image"}
        problem = self._missing(item)
        if problem:
            return {"key": key, "error": problem}
        seed = int(item.get("seed") or 0)
        started = time.perf_counter()
        native = self.model.native_size
        style = torch.cat([pil_to_tensor(s, (native, native)) for s in styles])
        with circular_padding([self.model.unet, self.model.vae], self.settings.get("tiling", "none")):
            style_latents = self.model.encode_images(style)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            run = self._run(item, style_latents, generator)
            images = tensor_to_pil(self.model.decode_latents(run.latents))
        meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.settings.items()}
        meta.update(operator=self.name, model=self.model_spec, seed=seed, num_styles=len(styles),
                    final_ad_loss=run.final_ad_loss, final_loss=run.losses[-1] if run.losses else None,
                    seconds=round(time.perf_counter() - started, 3))
        if self.kind == "t2i":
            meta["prompt"] = item.get("prompt") or ""
        result = {"key": key, "image": images[0], "meta": meta}
        if len(images) > 1:
            result["images"] = images
        return result

    def _missing(self, item: dict[str, Any]) -> str | None:
        return None

    def _latent_size(self) -> tuple[int, int]:
        width, height = self.settings["size"]
        return height // self.model.vae_scale, width // self.model.vae_scale

    def _run(self, item: dict[str, Any], style: torch.Tensor, generator: torch.Generator) -> ADRun:
        raise NotImplementedError


class ADText2Image(_ADOperator):
    """``ad-t2i``: prompt + style image(s) -> AD-guided sampling with CFG (and AdaIN by default).

    On a FLUX model (docs/ad.md, "FLUX") it runs :func:`operators.ad.flux.flux_ad_sample` instead of the UNet path.
    """

    name, kind, methods = "ad-t2i", "t2i", ("sample",)

    @classmethod
    def check_params(cls, params: dict[str, Any] | None, model: str | None = None) -> None:
        """As :meth:`_ADOperator.check_params`; with ``model`` known to be FLUX, against the FLUX params. With a
        model not known offline (a hub id, or none given), ``max_sequence_length`` is let through here and the
        check is completed when the operator is built."""
        params = dict(params or {})
        flux = flux_kind(model, offline=True)
        if flux:
            return cls._check_flux(params)
        if flux is None:
            params.pop("max_sequence_length", None)
        elif "max_sequence_length" in params:
            raise ValueError(f"{cls.name}: param 'max_sequence_length' applies to FLUX models only")
        super().check_params(params)

    @classmethod
    def _check_flux(cls, params: dict[str, Any]) -> None:
        for param in sorted(params):
            if param not in FLUX_PARAMS:
                raise ValueError(f"{cls.name}: param {param!r} does not apply to FLUX models; FLUX params: "
                                 f"{', '.join(sorted(FLUX_PARAMS))}")
        if params.get("method", "sample") != "sample":
            raise ValueError(f"{cls.name}: method must be 'sample' on FLUX, got {params['method']!r}")
        if params.get("precision", "fp32") not in DTYPES:
            raise ValueError(f"{cls.name}: precision must be one of {sorted(DTYPES)}, got {params['precision']!r}")

    def __init__(self, model: str, params: dict[str, Any] | None = None, device: str = "cpu") -> None:
        params = dict(params or {})
        self.flux = bool(flux_kind(model))
        if not self.flux:
            if "max_sequence_length" in params:
                raise ValueError(f"{self.name}: param 'max_sequence_length' applies to FLUX models only")
            super().__init__(model, params, device)
            return
        self._check_flux(params)
        self.model_spec = model
        precision = params.get("precision") or ("bf16" if str(device).startswith("cuda") else "fp32")
        fast = bool(params.get("fast", precision != "fp32"))
        self.pipe = load_flux_model(model, precision, str(device))
        settings = dict(FLUX_DEFAULTS)
        settings.update({k: v for k, v in params.items() if v is not None})
        settings.update(method="sample", precision=precision, fast=fast,
                        gradient_checkpointing=bool(params.get("gradient_checkpointing", fast)))
        calls = len(self.pipe.transformer.transformer_blocks) + len(self.pipe.transformer.single_transformer_blocks)
        layers = params.get("layers")
        if layers is None:
            settings["layers"] = (max(calls - FLUX_LAST_CALLS, 0), calls)
        else:
            start, end = (int(v) for v in layers)
            if not 0 <= start < end <= calls:
                raise ValueError(f"{self.name}: layers must be a range [start, end) within [0, {calls}] "
                                 f"(joint-attention calls, double- then single-stream), got {layers}")
            settings["layers"] = (start, end)
        native = int(self.pipe.default_sample_size) * self.pipe.vae_scale_factor
        settings["size"] = self._flux_size("size", params.get("size"), (native, native))
        settings["style_size"] = self._flux_size("style_size", params.get("style_size"), settings["size"])
        settings["num_images"] = int(settings["num_images"])
        if settings["num_images"] < 1:
            raise ValueError(f"{self.name}: num_images must be >= 1")
        for name, kind in (("steps", int), ("iters", int), ("max_sequence_length", int)):
            settings[name] = kind(settings[name])
            if settings[name] < 1:
                raise ValueError(f"{self.name}: {name} must be >= 1")
        self.settings = settings

    def _flux_size(self, name: str, size: Any, default: tuple[int, int]) -> tuple[int, int]:
        """An int or ``[width, height]`` in pixels, positive multiples of 16 (VAE /8, then 2x2 packing)."""
        multiple = 2 * self.pipe.vae_scale_factor
        if size is None:
            return default
        width, height = (size, size) if isinstance(size, int) else (int(v) for v in size)
        if width % multiple or height % multiple or width <= 0 or height <= 0:
            raise ValueError(f"{self.name}: {name} {width}x{height} must be positive multiples of {multiple}")
        return (width, height)

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not self.flux:
            return super().__call__(items)
        return [self._one_flux(item) for item in items]

    def _one_flux(self, item: dict[str, Any]) -> dict[str, Any]:
        """Images 0..n-1 drawn one after another from the item's generator; image 0 is exactly
        ``flux_ad_sample`` with that generator."""
        key = item.get("key")
        styles = self._styles(item)
        if not styles:
            return {"key": key, "error": f"{self.name}: no style image"}
        s = self.settings
        seed = int(item.get("seed") or 0)
        started = time.perf_counter()
        width, height = s["size"]
        style = torch.cat([pil_to_tensor(im, s["style_size"]) for im in styles])
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images, losses = [], []
        for _ in range(s["num_images"]):
            _, image, trace = flux_ad_sample(
                self.pipe, style, item.get("prompt") or "", height=height, width=width, steps=s["steps"],
                lr=float(s["lr"]), iters=s["iters"], layers=s["layers"], guidance_scale=float(s["guidance_scale"]),
                start_time=float(s["start_time"]), max_sequence_length=s["max_sequence_length"],
                generator=generator, gradient_checkpointing=bool(s["gradient_checkpointing"]),
                adain_on=bool(s["adain"]), fast=bool(s["fast"]))
            images.extend(tensor_to_pil(image))
            if trace["losses"] is not None:
                losses.append(float(trace["losses"][-1, -1]))
        meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}
        meta.update(operator=self.name, model=self.model_spec, family="flux", seed=seed, num_styles=len(styles),
                    final_ad_loss=losses[-1] if losses else None, prompt=item.get("prompt") or "",
                    seconds=round(time.perf_counter() - started, 3))
        result = {"key": key, "image": images[0], "meta": meta}
        if len(images) > 1:
            result["images"] = images
        return result

    def _run(self, item: dict[str, Any], style: torch.Tensor, generator: torch.Generator) -> ADRun:
        s = self.settings
        height, width = self._latent_size()
        return sample(self.model, style, None, prompt=item.get("prompt") or "",
                      negative_prompt=s["negative_prompt"], num_images=s["num_images"], height=height, width=width,
                      guidance_scale=float(s["guidance_scale"]), adain_on=bool(s["adain"]), cfg=self.config(),
                      generator=generator, start_time=float(s.get("start_time", 999)),
                      init_from_style=bool(s.get("init_from_style", False)))


class ADTransfer(_ADOperator):
    """``ad-transfer``: content image + style image(s); optimisation from the content latent, or sampling."""

    name, kind, methods = "ad-transfer", "transfer", ("optimize", "sample")

    def _missing(self, item: dict[str, Any]) -> str | None:
        return None if item.get("content") is not None else f"{self.name}: no content image"

    def _run(self, item: dict[str, Any], style: torch.Tensor, generator: torch.Generator) -> ADRun:
        s = self.settings
        height, width = self._latent_size()
        content = self.model.encode_images(pil_to_tensor(item["content"], tuple(s["size"])))
        if s["method"] == "optimize":
            return optimize(self.model, style, content, num_images=s["num_images"], height=height, width=width,
                            cfg=self.config(), generator=generator)
        return sample(self.model, style, content, prompt=item.get("prompt") or "",
                      negative_prompt=s.get("negative_prompt", ""), num_images=s["num_images"], height=height,
                      width=width, guidance_scale=float(s["guidance_scale"]), adain_on=bool(s["adain"]),
                      cfg=self.config(), generator=generator, start_time=float(s.get("start_time", 999)))


class ADTexture(_ADOperator):
    """``ad-texture``: style image(s) only; optimisation, sampling, or MultiDiffusion panorama; optional tiling;
    ``source_mask``/``target_mask`` label images for mask-controlled optimisation (:mod:`operators.ad.masks`)."""

    name, kind, methods = "ad-texture", "texture", ("optimize", "sample", "panorama")

    def __init__(self, model: str, params: dict[str, Any] | None = None, device: str = "cpu") -> None:
        super().__init__(model, params, device)
        tiling = self.settings.setdefault("tiling", "none")
        if tiling not in ("none", "xy", "x", "y"):
            raise ValueError(f"{self.name}: tiling must be none|xy|x|y, got {tiling!r}")
        if self.settings["method"] == "panorama":
            window = int(self.model.unet.config.sample_size)
            self.settings.setdefault("stride", max(window // 8, 1))
        self.label_masks = None
        if "source_mask" in self.settings:
            self.label_masks = LabelMasks(read_labels(self.settings["target_mask"]),
                                          read_labels(self.settings["source_mask"]))

    def _run(self, item: dict[str, Any], style: torch.Tensor, generator: torch.Generator) -> ADRun:
        s = self.settings
        height, width = self._latent_size()
        if s["method"] == "optimize":
            return optimize(self.model, style, None, num_images=s["num_images"], height=height, width=width,
                            cfg=self.config(), generator=generator, label_masks=self.label_masks)
        if s["method"] == "sample":
            return sample(self.model, style, None, prompt="", negative_prompt="", num_images=s["num_images"],
                          height=height, width=width, guidance_scale=float(s["guidance_scale"]),
                          adain_on=bool(s["adain"]), cfg=self.config(), generator=generator,
                          start_time=float(s.get("start_time", 999)))
        return panorama(self.model, style, num_images=s["num_images"], height=height, width=width,
                        stride=int(s["stride"]), view_batch_size=int(s["view_batch_size"]),
                        adain_on=bool(s["adain"]), cfg=self.config(), generator=generator)
