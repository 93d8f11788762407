"""Pass 0 of ``stylegen filter``: list the input tars (the driver holds their names only) and index them on Ray
tasks, a chunk of tars each, into one row per sample: its key, source id, tar URL and member offsets. No image byte
is read here."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.config import FilterRunConfig
from pipeline.io.fs import get_fs, read_range
from pipeline.io.sources import SourceError, expand, id_root, output_exclusion, relative_id
from pipeline.io.tar_index import index_tar
from pipeline.session import WorkerSourceError, run_step

if TYPE_CHECKING:
    from ray.data import Dataset

LISTING_TASKS = 2_000  # at most this many Ray tasks index the input tars (a chunk of tars each)
INPUT_SCHEMA = pa.schema([("key", pa.string()), ("content_id", pa.string()), ("url", pa.string()),
                          ("members", pa.string()), ("error", pa.string())])


def list_inputs(cfg: FilterRunConfig) -> list[tuple[str, str]]:
    """The input tars (URL, id base) in name order: the only per-file state the driver holds."""
    urls = expand(cfg.input.shards, "input.shards", exclude=output_exclusion(cfg.output.path),
                   policy=cfg.sources)
    if not urls:
        raise SourceError(f"input.shards: no files match {cfg.input.shards}")
    root = id_root(get_fs(cfg.input.shards)[1])
    return [(url, relative_id(url, root)) for url in urls]


def input_dataset(jobs: list[tuple[str, str]]) -> Dataset:
    """One row per input sample (key, source id, tar URL, member offsets; no image bytes read), the tars indexed
    by Ray tasks, a chunk of tars each (lazy: :func:`index_inputs` runs it once into the object store)."""
    import ray

    items = [{"url": url, "base": base} for url, base in jobs]
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), LISTING_TASKS))).map_batches(
        _index_block, batch_format="pyarrow", batch_size=None)


def index_inputs(jobs: list[tuple[str, str]]) -> Dataset:
    """:func:`input_dataset` indexed once into the object store (the driver holds block references only); a tar
    that cannot be read raises the SourceError the CLI prints."""
    return run_step(lambda: input_dataset(jobs).materialize(), "input.shards")  # made inside: it takes the context


def _index_block(batch: pa.Table) -> pa.Table:
    jobs = list(zip(batch.column("url").to_pylist(), batch.column("base").to_pylist(), strict=True))
    try:
        return pa.Table.from_pylist(index_tars(jobs), schema=INPUT_SCHEMA)
    except SourceError as exc:
        raise WorkerSourceError(str(exc)) from None


def index_tars(jobs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The rows of :func:`input_dataset` for ``jobs``, indexed in this process (``plan --count``, tests)."""
    rows = []
    for url, base in jobs:
        try:
            tar = index_tar(url)
        except FileNotFoundError:
            raise SourceError(f"input.shards: not found: {url}") from None
        except Exception as exc:
            raise SourceError(f"input.shards: cannot read {url} ({exc.__class__.__name__}: {exc})") from None
        for sample in tar.samples:
            source_id = f"{base}/{sample.key}"
            rows.append({"key": hashlib.sha1(source_id.encode()).hexdigest()[:16], "content_id": source_id,
                         "url": url, "members": json.dumps(sample.members, sort_keys=True), "error": sample.error})
    return rows


def caption(url: str, members: dict[str, list[int]]) -> str | None:
    """The sample's caption, by the reader ``run`` uses too (``pipeline.io.captions``): a bad one costs a warning
    and the caption, never the sample."""
    from pipeline.io.captions import read_caption

    return read_caption(lambda offset, size: read_range(url, offset, size), members, url)
