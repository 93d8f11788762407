"""Ray Data sinks that commit into an output (docs/architecture.md §5.3): shards with their index files, and keyed
parquet tables (the embeddings store of ``filter``). Both write through :class:`~pipeline.output.store.OutputStore`,
so a retried write task commits the same files under the same names."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from pipeline.config import OutputConfig
from pipeline.output.store import OutputStore, commit_rows, shard_name


def _tables(blocks: Iterable[Block]) -> list[pa.Table]:
    return [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]


class ShardDatasink(Datasink):
    """Full-sized shards and their index files, by :func:`~pipeline.output.store.commit_rows`. ``make_sample``
    builds a kept row's tar members (``run``: the generated image; ``filter``: the original members)."""

    def __init__(self, output: dict[str, Any],
                 make_sample: Callable[[dict[str, Any], OutputConfig], dict[str, bytes | str]] | None = None):
        self.output = OutputConfig.model_validate(output)
        self.make_sample = make_sample

    @property
    def min_rows_per_write(self) -> int:
        return self.output.samples_per_shard

    def write(self, blocks: Iterable[Block], ctx) -> dict[str, int]:
        rows = [row for table in _tables(blocks) for row in table.to_pylist()]
        if not rows:
            return {}
        return commit_rows(OutputStore(self.output.path, fsync=self.output.fsync), rows, self.output,
                           make_sample=self.make_sample)


class TableDatasink(Datasink):
    """One parquet file ``<sha1(keys)>.parquet`` per write task in the store at ``path``, cast to ``schema``."""

    def __init__(self, path: str, fsync: bool, schema: pa.Schema):
        self.path, self.fsync, self.schema = path, fsync, schema

    def write(self, blocks: Iterable[Block], ctx) -> int:
        tables = _tables(blocks)
        if not tables:
            return 0
        table = pa.concat_tables(tables).cast(self.schema)
        OutputStore(self.path, fsync=self.fsync).put_table(".", shard_name(table.column("key").to_pylist()), table)
        return table.num_rows
