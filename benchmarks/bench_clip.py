"""CLIP scoring stage vs. open_clip's batched ``encode_image`` on the same images, one process
(docs/architecture.md §8 target: throughput ratio >= 0.90).

The stage (``pipeline.filter.embed.Embedder``) reads each image with a ranged read from a WebDataset tar, decodes
it under the pixel limit, records its size, preprocesses, encodes and L2-normalises. The baseline gets the
same encoded bytes in memory and does PIL decode + open_clip preprocess + ``encode_image``. Samples carry no
caption so both sides do the same model work; the figure with captions (adds ``encode_text``) is reported
beside it.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import median_time, report  # noqa: E402
from tests.data_paths import samples_dir  # noqa: E402

N, BATCH, MODEL = 64, 32, "ViT-B-32"


def main() -> None:
    import torch
    from PIL import Image

    from pipeline.filter.embed import Embedder
    from pipeline.io.tar_index import index_tar

    torch.set_num_threads(2)
    files = sorted((samples_dir() / "content").iterdir()) + sorted((samples_dir() / "style").iterdir())
    payloads = [(files[i % len(files)].read_bytes(), files[i % len(files)].suffix.lstrip(".").lower())
                for i in range(N)]
    root = Path(tempfile.mkdtemp(prefix="bench-clip-"))
    rows = {}
    for captions in (False, True):
        path = root / f"c{int(captions)}.tar"
        with tarfile.open(path, "w") as tar:
            for i, (data, ext) in enumerate(payloads):
                members = [(ext, data)] + ([("txt", f"a photo number {i}".encode())] if captions else [])
                for member_ext, payload in members:
                    info = tarfile.TarInfo(f"k{i:04d}.{member_ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        rows[captions] = [{"key": s.key, "url": str(path), "members": json.dumps(s.members)}
                          for s in index_tar(str(path)).samples]

    stage = Embedder({"clip_model": MODEL, "clip_pretrained": "none", "num_gpus": 0}, {"max_side": 512})
    model, preprocess = stage.scorer.model, stage.scorer.preprocess

    def run_stage(captions: bool):
        for start in range(0, N, BATCH):
            stage.embed(rows[captions][start:start + BATCH])

    @torch.inference_mode()
    def baseline():
        for start in range(0, N, BATCH):
            images = [Image.open(io.BytesIO(d)).convert("RGB") for d, _ in payloads[start:start + BATCH]]
            emb = model.encode_image(torch.stack([preprocess(im) for im in images]))
            torch.nn.functional.normalize(emb, dim=-1)

    t_base = median_time(baseline, repeats=3)
    t_stage = median_time(lambda: run_stage(False), repeats=3)
    t_caps = median_time(lambda: run_stage(True), repeats=3)
    shutil.rmtree(root, ignore_errors=True)
    ratio = t_base / t_stage
    report("CLIP scoring stage vs open_clip encode_image", ratio=ratio, target=">= 0.90", ok=ratio >= 0.90,
           what=f"throughput ratio (images/s), {MODEL}, batch {BATCH}, same encoded images",
           stage_images_per_s=round(N / t_stage, 2), open_clip_images_per_s=round(N / t_base, 2),
           with_captions_images_per_s=round(N / t_caps, 2))


if __name__ == "__main__":
    main()
