"""Resume against the committed index without the driver holding keys (docs/architecture.md §10): the planned samples
not yet indexed (an anti-join), and the index statuses of the planned keys (the dataset totals).

Two ways, one answer. A small index (at most ``BROADCAST_KEYS`` rows, estimated from the file count) is read by
each worker itself (once per process) and looked up there: no shuffle, so a resume of a small job takes seconds.
A larger one is joined by Ray Data's hash join (``Dataset.join``), which scales with the cluster.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.fs import arrow_fs

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger(__name__)

BROADCAST_KEYS = 2_000_000
_LOOKUPS: dict[str, dict[str, str]] = {}  # per worker process: the index as one call saw it (by a fresh token)


def join_partitions(n_index_files: int) -> int:
    """Hash partitions of a join with the index: about one per 64 index files, at least four."""
    return max(4, min(512, n_index_files // 64))


def broadcast(index_files: list[str], rows_per_file: int) -> bool:
    return len(index_files) * max(1, rows_per_file) <= BROADCAST_KEYS


def _lookup(url: str, files: tuple[str, ...], token: str, column: str | None = "status") -> dict[str, Any]:
    """key -> ``column`` (True without one) of the files, read in this worker; cached under ``token``, new for
    every call of :func:`todo_dataset`/:func:`status_totals` (index files are rewritten in place by
    --retry-failed)."""
    if token not in _LOOKUPS:
        from pipeline.output.store import DamagedFile, OutputStore

        store = OutputStore(url)
        _LOOKUPS.clear()
        table = {}
        for path in files:
            try:
                part = store.read_parquet(path, ["key"] + ([column] if column else []))
            except (DamagedFile, FileNotFoundError) as exc:  # its samples count as not done (a run quarantines it)
                log.warning("skipping unreadable index file %s (%s)", path, exc.__class__.__name__)
                continue
            values = part.column(column).to_pylist() if column else [True] * part.num_rows
            table.update(zip(part.column("key").to_pylist(), values, strict=True))
        _LOOKUPS[token] = table
    return _LOOKUPS[token]


def _not_indexed(batch: pa.Table, url: str, files: tuple[str, ...], token: str, column: str | None) -> pa.Table:
    index = _lookup(url, files, token, column)
    return batch.filter(pa.array([k not in index for k in batch.column("key").to_pylist()], pa.bool_()))


def _statuses(batch: pa.Table, url: str, files: tuple[str, ...], token: str) -> pa.Table:
    index = _lookup(url, files, token)
    found = pa.array([index.get(k) for k in batch.column("key").to_pylist()], pa.string()).drop_null()
    counts = pc.value_counts(found)
    return pa.table({"status": counts.field("values"), "n": counts.field("counts")},
                    schema=pa.schema([("status", pa.string()), ("n", pa.int64())]))


def _lookup_args(store, index_files: list[str]) -> dict[str, Any]:
    return {"url": store.url, "files": tuple(index_files), "token": uuid.uuid4().hex}


def todo_dataset(plan: Dataset, store, index_files: list[str], rows_per_file: int,
                 column: str | None = "status") -> Dataset:
    """The planned samples without a row in the committed index (or in any keyed parquet files: the filter's
    embeddings, with ``column=None``)."""
    if not index_files:
        return plan
    if broadcast(index_files, rows_per_file):
        return plan.map_batches(_not_indexed, batch_format="pyarrow", batch_size=None,
                                fn_kwargs=_lookup_args(store, index_files) | {"column": column})
    import ray

    keys = ray.data.read_parquet(index_files, filesystem=arrow_fs(store.fs), columns=["key"])
    return plan.join(keys, "left_anti", num_partitions=join_partitions(len(index_files)), on=("key",))


def status_totals(plan: Dataset, store, index_files: list[str], rows_per_file: int) -> dict[str, int]:
    """How many planned keys the index holds, by status."""
    totals = {"kept": 0, "rejected": 0, "failed": 0}
    if not index_files:
        return totals
    keys = plan.select_columns(["key"])
    if broadcast(index_files, rows_per_file):
        for row in keys.map_batches(_statuses, batch_format="pyarrow", batch_size=None,
                                    fn_kwargs=_lookup_args(store, index_files)).take_all():
            totals[row["status"]] = totals.get(row["status"], 0) + row["n"]
        return totals
    import ray

    index = ray.data.read_parquet(index_files, filesystem=arrow_fs(store.fs), columns=["key", "status"])
    joined = keys.join(index, "inner", num_partitions=join_partitions(len(index_files)), on=("key",))
    for row in joined.groupby("status").count().take_all():
        totals[row["status"]] = row["count()"]
    return totals
