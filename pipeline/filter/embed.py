"""Pass 1 of ``stylegen filter``: the embedding actor. For every input sample not yet in the embeddings store it
decodes the image under ``run``'s guards, records its size and hash, and computes L2-normalised image and caption
embeddings with the caption's CLIP score (and the quality heads' scores). A later filter with other thresholds
reuses them."""

from __future__ import annotations

import hashlib
import io
import json
import re
from typing import Any

import pyarrow as pa

from pipeline.config import DecodeConfig
from pipeline.filter.inputs import caption
from pipeline.io.fs import read_range
from pipeline.io.members import kept_members, screened_image, shown
from pipeline.schema import EMB_SCHEMA
from pipeline.session import pick_device


def _stable(exc: BaseException) -> str:
    """An exception as reason text that is the same on every run: no ``<... object at 0x...>`` addresses."""
    return _ADDRESS_RE.sub("<object>", f"{exc}")


_ADDRESS_RE = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


class Embedder:
    """Actor: image + caption embeddings and the caption CLIP score, batched."""

    def __init__(self, scoring: dict[str, Any], decode: dict[str, Any]):
        from operators.clip_score import ClipScorer
        from operators.heads import HeadSet

        device = pick_device(float(scoring.get("num_gpus") or 0))
        self.scorer = ClipScorer(scoring["clip_model"], scoring["clip_pretrained"], device=device)
        self.heads = HeadSet(scoring.get("heads") or {}, self.scorer.embed_dim, device=device)
        self.decode = DecodeConfig.model_validate(decode)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(self.embed(batch.to_pylist()), schema=EMB_SCHEMA)

    def embed(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from PIL import Image

        from pipeline.io.images import DecodeError, decode_image

        out, images, captions = [], [], []
        for row in rows:
            members = json.loads(row["members"])
            rec = {"key": row["key"], "clip": None, "width": None, "height": None, "caption": None, "error": None,
                   "image_emb": None, "text_emb": None, "sha1": None, "scores": None}
            out.append(rec)
            ext = screened_image(members)  # the one image member a kept sample keeps (pipeline.io.members)
            if row.get("error"):
                rec["error"] = row["error"]
                continue
            if ext is None:
                rec["error"] = f"no image member (has: {', '.join(shown(e) for e in sorted(members))})"
                continue
            oversized = [e for e in kept_members(members)[0] if members[e][1] > self.decode.max_bytes]
            if oversized:  # every member a kept sample copies is bounded, checked from the tar index alone
                e = oversized[0]
                rec["error"] = f"member .{shown(e)}: {members[e][1]} bytes, more than decode.max_bytes=" \
                               f"{self.decode.max_bytes}"
                continue
            try:
                data = read_range(row["url"], *members[ext], max_bytes=self.decode.max_bytes)
                rec["sha1"] = hashlib.sha1(data).hexdigest()
                # the guards of `run` (decode.max_pixels, max_aspect) from the header first, stable reasons
                image = decode_image(data, max_pixels=self.decode.max_pixels, max_side=self.decode.max_side,
                                     max_aspect=self.decode.max_aspect)
                with Image.open(io.BytesIO(data)) as probe:
                    rec["width"], rec["height"] = probe.size  # the stored size (decode_image may shrink it)
                rec["caption"] = caption(row["url"], members)
            except (DecodeError, OSError, ValueError, SyntaxError) as exc:
                rec["error"] = f"image: {_stable(exc)}"
                continue
            images.append((rec, image))
            captions.append(rec["caption"])
        if images:
            img_emb = self.scorer.embed_images([im for _, im in images])
            with_text = [i for i, c in enumerate(captions) if c]
            txt_emb = self.scorer.embed_texts([captions[i] for i in with_text]) if with_text else None
            heads = self.heads.rows(img_emb) if self.heads else [None] * len(images)
            for (rec, _), emb, h in zip(images, img_emb, heads, strict=True):
                rec["image_emb"] = emb.tolist()
                rec["scores"] = json.dumps(h, sort_keys=True) if h is not None else None
            for j, i in enumerate(with_text):
                rec = images[i][0]
                rec["text_emb"] = txt_emb[j].tolist()
                rec["clip"] = float(img_emb[i] @ txt_emb[j])
        return out
