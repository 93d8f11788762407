"""The Arrow schemas and status names every layer shares (docs/architecture.md §5): the rows the stages pass
along, the index files of an output, and the embeddings store of ``stylegen filter``. At the bottom of the package,
so that a writer, a reader and a stage agree on a column without importing each other."""

from __future__ import annotations

import pyarrow as pa

ROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("prompt", pa.string()),
        ("content_id", pa.string()),
        ("style_id", pa.string()),
        ("seed", pa.int64()),
        ("content_url", pa.string()),
        ("content_offset", pa.int64()),
        ("content_size", pa.int64()),
        ("style_url", pa.string()),
        ("style_offset", pa.int64()),
        ("style_size", pa.int64()),
        ("error", pa.string()),
        ("content_bytes", pa.binary()),
        ("style_bytes", pa.binary()),
        ("image", pa.binary()),
        ("meta", pa.string()),
        ("clip_content", pa.float64()),
        ("clip_style", pa.float64()),
        ("scores", pa.string()),  # JSON {head: score} of scoring.heads; null without heads (index: score_<head>)
        ("worker", pa.string()),
    ]
)

FAILED = "failed"
KEPT = "kept"
REJECTED = "rejected"


# The index columns, in order; every one but `shard` is a column of the rows the stages pass along. The input
# locations let a sample be re-read (report) and regenerated (reproduce). ``shard_size`` (bytes of the tar when it
# was committed) lets a listing alone find a truncated or replaced shard.
INDEX_COLUMNS = ("key", "status", "reason", "shard", "shard_size", "prompt", "content_id", "style_id", "seed",
                 "clip_content", "clip_style", "meta", "content_url", "content_offset", "content_size", "style_url",
                 "style_offset", "style_size")
OWN_FIELDS = {"shard": pa.field("shard", pa.string()), "shard_size": pa.field("shard_size", pa.int64())}
INDEX_SCHEMA = pa.schema([OWN_FIELDS.get(name) or ROW_SCHEMA.field(name) for name in INDEX_COLUMNS])
# Quality heads (scoring.heads) add one float64 column ``score_<name>`` each, after the fixed columns; an index
# file written without heads has exactly INDEX_SCHEMA.
SCORE_PREFIX = "score_"


def index_field(name: str) -> pa.Field:
    """The type of an index column, ``score_<head>`` columns included."""
    if name.startswith(SCORE_PREFIX) and name not in INDEX_SCHEMA.names:
        return pa.field(name, pa.float64())
    return INDEX_SCHEMA.field(name)


def conform_index(table: pa.Table, columns: list[str] | None) -> pa.Table:
    """An index table in today's schema: files written before a column existed get it as nulls. Reading all
    columns keeps the file's ``score_<head>`` columns too."""
    if columns is None:
        columns = list(INDEX_SCHEMA.names) + sorted(c for c in table.column_names if c.startswith(SCORE_PREFIX)
                                                     and c not in INDEX_SCHEMA.names)
    schema = pa.schema([index_field(c) for c in columns])
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)


# The embeddings store of ``stylegen filter`` (``EMB/<name>.parquet``).
EMB_SCHEMA = pa.schema([
    ("key", pa.string()), ("clip", pa.float64()), ("width", pa.int64()), ("height", pa.int64()),
    ("caption", pa.string()), ("error", pa.string()),
    ("image_emb", pa.list_(pa.float32())), ("text_emb", pa.list_(pa.float32())),
    ("sha1", pa.string()),  # of the image member's bytes (exact dedup); null in files embedded before it existed
    # JSON {head: score} of the scoring.heads configured when embedded (a record for readers of the store; the
    # decisions recompute the heads from image_emb, so a re-filter with other heads needs no CLIP work)
    ("scores", pa.string()),
])
