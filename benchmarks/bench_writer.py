"""Shard writer vs. raw ``tarfile`` writing the same bytes (docs/architecture.md §8 target: throughput ratio >= 0.80).

Both sides write the same kept samples (image, json, txt members) into the same number of tar files on
the same disk; the writer also builds index parquets, fsyncs and renames (its price for atomicity and
durability). The ratio with ``output.fsync: false`` is reported beside it: raw tarfile never fsyncs.
"""

from __future__ import annotations

import io
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import median_time, report  # noqa: E402
from pipeline.config import OutputConfig  # noqa: E402
from pipeline.io.images import encode_image  # noqa: E402
from pipeline.output.store import OutputStore, commit_rows, to_sample  # noqa: E402
from tests.data_paths import samples_dir  # noqa: E402

SAMPLES = samples_dir()
N, PER_SHARD = 512, 128


def make_rows() -> list[dict]:
    from PIL import Image

    images = []
    for path in sorted((SAMPLES / "content").iterdir()):
        im = Image.open(path).convert("RGB")
        im.thumbnail((256, 256))
        images.append(encode_image(im, "png"))
    return [{"key": f"{i:016x}", "status": "kept", "reason": None, "prompt": f"prompt {i}", "content_id": f"c{i}",
             "style_id": "s", "seed": i, "image": images[i % len(images)], "meta": '{"operator": "bench"}',
             "clip_content": 0.1, "clip_style": 0.2} for i in range(N)]


def main() -> None:
    rows = make_rows()
    output = OutputConfig(path="unused", samples_per_shard=PER_SHARD)
    samples = [to_sample(r, output) for r in rows]
    total_bytes = sum(len(r["image"]) for r in rows)
    root = Path(tempfile.mkdtemp(prefix="bench-writer-"))

    def ours(fsync: bool = True):
        out = root / "ours"
        shutil.rmtree(out, ignore_errors=True)
        store = OutputStore(str(out), fsync=fsync)
        store.prepare()
        commit_rows(store, rows, output.model_copy(update={"path": str(out), "fsync": fsync}))

    def raw():
        out = root / "raw"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        for shard in range(N // PER_SHARD):
            with tarfile.open(out / f"{shard}.tar", "w") as tar:
                for sample in samples[shard * PER_SHARD:(shard + 1) * PER_SHARD]:
                    for ext, data in sorted(sample.items()):
                        if ext == "__key__":
                            continue
                        info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))

    t_ours = median_time(ours, repeats=7)
    t_raw = median_time(raw, repeats=7)
    t_nosync = median_time(lambda: ours(fsync=False), repeats=7)
    shutil.rmtree(root, ignore_errors=True)
    ratio = t_raw / t_ours  # throughput ratio = (N / t_ours) / (N / t_raw)
    report("shard writer vs raw tarfile", ratio=ratio, target=">= 0.80", ok=ratio >= 0.80,
           what="throughput ratio (samples/s), same bytes, same disk",
           ours_samples_per_s=round(N / t_ours, 1), raw_samples_per_s=round(N / t_raw, 1),
           mbytes=round(total_bytes / 1e6, 1), ratio_without_fsync=round(t_raw / t_nosync, 3))


if __name__ == "__main__":
    main()
