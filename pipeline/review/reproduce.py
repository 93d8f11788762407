"""``stylegen reproduce``: regenerate one sample from what the output recorded and compare it with the stored one.

A corpus is only trustworthy if a sample can be traced to its inputs and settings and made again. The inputs
are re-read from the source locations in the index and decoded exactly as the decode stage did (same
``decode_image`` settings, same lossless transport round trip), the operator is rebuilt from the run's
config in ``run.json``, and the output is encoded with the run's output settings. Same device and precision
should give the same pixels; otherwise the difference is measured.
"""

from __future__ import annotations

import json
import logging
import math
import tarfile
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline.output.store import OutputStore
from pipeline.redact import is_redacted, redact_text
from pipeline.review.untrusted import UntrustedValue, open_stored, read_member, shard_url

log = logging.getLogger(__name__)


class UnknownKey(LookupError):
    """The key has no index row in this output."""


class NotReproducible(LookupError):
    """The key is known but there is nothing to compare with (not kept) or no recorded config."""


@dataclass
class Reproduction:
    key: str
    operator: str
    device: str
    identical: bool  # same pixels
    bytes_identical: bool  # same encoded file
    max_abs_diff: int
    psnr_db: float | None  # None when identical (infinite)
    size: tuple[int, int]
    stored_size: tuple[int, int]
    image: Image.Image

    def line(self) -> str:
        if self.identical:
            return (f"identical: {self.key} ({self.operator} on {self.device}); pixels match bit for bit"
                    + ("" if self.bytes_identical else " (encoded bytes differ)"))
        if self.size != self.stored_size:
            return f"different: {self.key} size {self.size} vs stored {self.stored_size}"
        return (f"different: {self.key} ({self.operator} on {self.device}) max_abs_diff={self.max_abs_diff} "
                f"psnr={self.psnr_db:.2f} dB")


def compare(a: Image.Image, b: Image.Image) -> tuple[int, float | None]:
    """Max absolute pixel difference (0..255) and PSNR in dB (None when identical) of two RGB images."""
    x = np.asarray(a.convert("RGB"), dtype=np.int16)
    y = np.asarray(b.convert("RGB"), dtype=np.int16)
    diff = np.abs(x - y)
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return int(diff.max(initial=0)), (None if mse == 0 else 10 * math.log10(255.0**2 / mse))


def find_row(store: OutputStore, key: str) -> dict[str, Any]:
    """The key's index row (UnknownKey when it has none)."""
    import pyarrow.compute as pc

    table = store.read_tables("index", None, skip_damaged=True)
    if "key" in table.column_names:
        rows = table.filter(pc.equal(table.column("key"), key)).to_pylist()
        if rows:
            return rows[0]
    raise UnknownKey(f"unknown key {key!r}: no index row in {store.url}")


def stored_image(store: OutputStore, row: dict[str, Any]) -> bytes:
    """The output image bytes of a kept sample, from its shard (a plain file name under ``shards/`` only)."""
    try:
        url = shard_url(store.shards, row.get("shard"))
        with store.fs.open(url, "rb") as f, tarfile.open(fileobj=f) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if key == row["key"] and ext in ("png", "jpg", "jpeg", "webp") and member.isfile():
                    return read_member(tar, member)
    except UntrustedValue as exc:
        raise NotReproducible(f"{row['key']}: {exc}") from None
    raise NotReproducible(f"{row['key']}: no image in shard {row['shard']}")


def _inputs(row: dict[str, Any], cfg) -> dict[str, Any]:
    """Where the inputs came from: the index row, or (older outputs, and sources whose URLs carried credentials,
    which the index does not store) the sample re-planned from the config."""
    redacted = [side for side in ("content", "style") if is_redacted(row.get(f"{side}_url"))]
    if row.get("style_url") and not redacted:
        return row
    if redacted:
        try:
            return _replanned(row, cfg)
        except Exception as exc:  # a config of redacted URLs cannot be planned: say why, once
            raise NotReproducible(
                f"{row['key']}: its {' and '.join(redacted)} source URL carried credentials and was not stored; "
                "pass the run's config with --config to re-read the inputs from their sources "
                f"({redact_text(str(exc))[:200]})") from None
    return _replanned(row, cfg)


def _replanned(row: dict[str, Any], cfg) -> dict[str, Any]:
    from pipeline.plan.keys import build_plan

    for sample in build_plan(cfg):
        if sample.key == row["key"]:
            ref = sample.to_row()
            if any(is_redacted(ref.get(f"{side}_url")) for side in ("content", "style")):
                raise NotReproducible("the config's source URLs are redacted too (run.json)")
            return ref
    raise NotReproducible(f"{row['key']}: its inputs are not recorded and re-planning the config does not find it")


def decode_input(ref: dict[str, Any], side: str, cfg) -> Image.Image | None:
    """Fetch and decode one input exactly as the decode stage does (decode_image, then the PNG transport)."""
    from pipeline.io.fs import RefusedInputError, check_protocol, read_range
    from pipeline.io.images import decode_image, encode_transport, open_rgb

    url = ref.get(f"{side}_url")
    if not url:
        return None
    size = ref.get(f"{side}_size")
    d = cfg.decode
    try:  # an index is data: its URL gets the run's allow-list and byte cap, as when the run read it
        check_protocol(url, cfg.sources.protocols)
        data = read_range(url, ref.get(f"{side}_offset") or 0, -1 if size is None else size, max_bytes=d.max_bytes)
    except RefusedInputError as exc:
        raise NotReproducible(f"{side} input refused: {exc}") from None
    im = decode_image(data, max_pixels=d.max_pixels, max_side=d.max_side, max_aspect=d.max_aspect)
    return open_rgb(encode_transport(im))


def _device(row: dict[str, Any], device: str | None) -> str:
    """The device the sample was made on when this machine has it, else the CPU."""
    if device:
        return device
    try:
        meta = json.loads(row.get("meta") or "{}")
    except (TypeError, ValueError):
        meta = {}
    worker = meta.get("worker") if isinstance(meta, dict) else None  # an edited index is data, not a crash
    recorded = worker.get("device") if isinstance(worker, dict) else None
    recorded = recorded if isinstance(recorded, str) else "cpu"
    if recorded.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return "cuda:0"
        log.warning("sample was made on %s; no CUDA here, regenerating on the CPU (expect differences)", recorded)
    return "cpu"


def load_run_config(store: OutputStore, config=None):
    """The run's config: the one given, else ``run.json``'s."""
    if config is not None:
        return config
    from pipeline.config import validate_config

    record = store.read_json("run.json")
    if not record or "config" not in record:
        raise NotReproducible(f"no run.json in {store.url} (partial run?): pass the run's config with --config")
    from operators import is_plugin

    name = (record["config"].get("operator") or {}).get("name") if isinstance(record["config"], dict) else None
    if is_plugin(name):
        raise NotReproducible(f"{store.url}/run.json names the plug-in operator {name!r}; stylegen never imports "
                              "code that an output names: pass the run's config with --config")
    return validate_config(record["config"], source=f"{store.url}/run.json", untrusted=True)


def _generate(cfg, item: dict[str, Any], device: str, threads: int | None) -> dict[str, Any]:
    """Run the operator on one item with the CPU thread count of a stylize actor: Ray gives an actor
    ``OMP_NUM_THREADS = num_cpus``, and float reductions split over another number of threads round differently."""
    import torch

    from operators import build_operator

    before = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, int(cfg.operator.num_cpus)))
    try:
        return build_operator(cfg.operator.model_dump(), device=device)([item])[0]
    finally:
        torch.set_num_threads(before)


def reproduce(output: str, key: str, *, config=None, device: str | None = None,
              threads: int | None = None) -> Reproduction:
    """Regenerate ``key`` of ``output`` and compare it with the stored image."""
    from pipeline.io.images import encode_image, open_rgb

    store = OutputStore(output)
    row = find_row(store, key)
    if row["status"] != "kept":
        raise NotReproducible(f"{key} is {row['status']} ({redact_text(str(row.get('reason')))}): no stored image "
                              "to compare with")
    if not isinstance(row.get("seed"), int):
        raise NotReproducible(f"{key}: its index row has no seed ({row.get('seed')!r})")
    cfg = load_run_config(store, config)
    stored = stored_image(store, row)
    try:
        old = open_stored(stored, cfg.decode.max_pixels)  # the stored image is data: the run's pixel limit
    except UntrustedValue as exc:
        raise NotReproducible(f"{key}: {exc}") from None
    ref = _inputs(row, cfg)
    dev = _device(row, device)
    item = {"key": key, "prompt": row["prompt"], "style": decode_input(ref, "style", cfg),
            "content": decode_input(ref, "content", cfg), "seed": int(row["seed"])}
    result = _generate(cfg, item, dev, threads)
    if result.get("error") or result.get("image") is None:
        raise RuntimeError(f"{key}: the operator did not produce an image: {result.get('error')}")
    out = cfg.output
    data = encode_image(result["image"], out.image_format, out.jpeg_quality)
    new = open_rgb(data)
    if new.size != old.size:
        return Reproduction(key, cfg.operator.name, dev, False, False, 255, 0.0, new.size, old.size, new)
    max_diff, psnr = compare(new, old)
    return Reproduction(key, cfg.operator.name, dev, max_diff == 0, data == stored, max_diff, psnr, new.size,
                        old.size, new)
