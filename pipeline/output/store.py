"""The output directory and its commit protocol (docs/architecture.md §5).

``OUTPUT/shards/<name>.tar`` and ``OUTPUT/index/<name>.parquet`` are written as a pair whose name is
``sha1(sorted keys)[:16]``: a retried write of the same rows rewrites the same pair, different rows can
never collide. The tar goes first and the index last; the index is the commit marker, so a tar without
its index is an orphan from a crash and is quarantined at start-up (pipeline.output.integrity; nothing is ever
deleted). The layout folders are created only in an output stylegen made (pipeline.output.ownership). Locally each
file is staged in ``OUTPUT/_tmp``, fsynced and renamed into place; on S3 a file is uploaded whole (one PUT
or a completed multipart upload), which is never visible half-written. :func:`commit_rows` stages a shard while the
previous one is published in the background (pipeline.output.publish), in the same order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import OutputConfig
from pipeline.io.fs import StoreReadError, get_fs, is_remote, is_transient, open_store_file, retry_transient
from pipeline.output.ownership import check_layout
from pipeline.output.publish import Publisher
from pipeline.output.tars import write_tar
from pipeline.schema import INDEX_SCHEMA, SCORE_PREFIX, conform_index, index_field

log = logging.getLogger(__name__)


class OutputStore:
    """Paths, recovery and atomic commits for one output location (local path or URL)."""

    def __init__(self, url: str, fsync: bool = True):
        self.url = url
        self.fsync = fsync
        self.remote = is_remote(url)
        self.fs, self.root = get_fs(url)
        self.shards = f"{self.root}/shards"
        self.index = f"{self.root}/index"
        self.tmp = None if self.remote else f"{self.root}/_tmp"

    # ---- start-up ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the layout (refusing layout entries that are links or of the wrong type) and clear ``_tmp``.
        Orphan shards are left for :func:`pipeline.output.integrity.startup_repair`, which quarantines them."""
        check_layout(self.url)
        if not self.remote:
            for d in (self.shards, self.index, self.tmp):
                os.makedirs(d, exist_ok=True)
        self.clear_tmp()
        self.fs.invalidate_cache()

    def clear_tmp(self) -> None:
        """Remove staged files a crashed run left behind (local only; S3 stages outside the bucket)."""
        if not self.remote and os.path.isdir(self.tmp):
            for name in os.listdir(self.tmp):
                os.remove(os.path.join(self.tmp, name))

    def _list(self, directory: str, suffix: str) -> list[str]:
        try:
            return sorted(p for p in self.fs.ls(directory, detail=False) if p.endswith(suffix))
        except FileNotFoundError:
            return []

    @staticmethod
    def stem(path: str) -> str:
        return path.rsplit("/", 1)[-1].rsplit(".", 1)[0]

    def index_files(self) -> list[str]:
        self.fs.invalidate_cache()
        return self._list(self.index, ".parquet")

    def shard_files(self) -> list[str]:
        self.fs.invalidate_cache()
        return self._list(self.shards, ".tar")

    def read_parquet(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """One parquet file. A store that fails the read (5xx, timeout, reset: retried with backoff; credentials,
        access: not) raises :class:`StoreUnavailable`; only bytes that arrived and do not parse raise
        :class:`DamagedFile` naming it: the store's failure is never taken for damage."""
        def read() -> pa.Table:
            with open_store_file(self.fs, path) as f:
                return pq.read_table(f, columns=columns)

        try:
            return retry_transient(read, what=path) if self.remote else read()
        except FileNotFoundError:
            raise
        except StoreReadError as exc:
            raise store_unavailable(path, exc) from None
        except Exception as exc:  # truncated, garbled, wrong schema: the file is damaged, not the run
            raise DamagedFile(path, f"unreadable parquet ({exc.__class__.__name__}: {exc})") from None

    def read_index(self, columns: list[str] | None = None, *, skip_damaged: bool = False) -> pa.Table:
        """All index rows; a damaged file raises :class:`DamagedFile`, or is skipped with a warning."""
        tables = [conform_index(t, columns) for t in self._read_each(self.index_files(), columns, skip_damaged)]
        if not tables:
            schema = INDEX_SCHEMA if columns is None else pa.schema([index_field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables, promote_options="default")  # score_<head> columns absent in some files

    def _read_each(self, paths: list[str], columns: list[str] | None, skip_damaged: bool) -> list[pa.Table]:
        tables = []
        for path in paths:
            try:
                tables.append(self.read_parquet(path, columns))
            except DamagedFile as exc:
                if not skip_damaged:
                    raise
                log.warning("skipping %s (run `stylegen verify %s --repair`)", exc, self.url)
        return tables

    def done_keys(self) -> set[str]:
        return set(self.read_index(["key"]).column("key").to_pylist())

    # ---- commits ----------------------------------------------------------------------------------
    def _publish(self, local_tmp: str, final: str) -> None:
        with _named(final):
            self._publish_unnamed(local_tmp, final)

    def _publish_unnamed(self, local_tmp: str, final: str) -> None:
        if self.remote:
            try:
                self.fs.put_file(local_tmp, final)
            finally:
                os.remove(local_tmp)
        else:
            if self.fsync:
                with open(local_tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(local_tmp, final)
            if self.fsync:
                _fsync_dir(os.path.dirname(final))

    def _stage_path(self, suffix: str) -> str:
        directory = self.tmp if not self.remote else tempfile.gettempdir()
        return os.path.join(directory, f"{uuid.uuid4().hex}{suffix}")

    def stage(self, write: Callable[[str], None], suffix: str = "") -> tuple[str, int]:
        """``write(tmp)`` into a new staged file; return its path and size. A failed write names its file and
        leaves no staged file behind (a full disk is not made fuller)."""
        self._ensure_layout()
        tmp = self._stage_path(suffix)
        try:
            with _named(tmp):
                write(tmp)
            return tmp, os.path.getsize(tmp)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    def publish(self, staged: list[tuple[str, str]]) -> None:
        """Publish staged files ``(tmp, final)`` in order, each made durable and visible before the next; on a
        failure the rest stay unpublished (call :meth:`discard`)."""
        for tmp, final in staged:
            self._publish(tmp, final)

    @staticmethod
    def discard(staged: list[tuple[str, str]]) -> None:
        """Remove staged files that were not published (those that were are gone from staging already)."""
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def write_file(self, final: str, write: Callable[[str], None], suffix: str = "") -> int:
        """Stage ``write(tmp)``, then publish it atomically as ``final``; return its size. A failed write names
        its file and leaves no staged file behind (a full disk is not made fuller)."""
        tmp, size = self.stage(write, suffix)
        try:
            self._publish(tmp, final)
        except BaseException:
            self.discard([(tmp, final)])
            raise
        return size

    def stage_commit(self, name: str, samples: list[dict[str, bytes | str]], index: pa.Table,
                     ) -> list[tuple[str, str]]:
        """Stage the shard (if any sample is kept) and then its index, which records the shard's size; return
        ``[(tmp, final)]`` in publication order: the tar first, the index (the commit marker) last."""
        staged = []
        try:
            if samples:
                def tar(tmp: str) -> None:
                    with open(tmp, "wb") as f:
                        write_tar(f, samples)

                tmp, size = self.stage(tar, ".tar")
                staged.append((tmp, f"{self.shards}/{name}.tar"))
                if "shard_size" in index.column_names:
                    sizes = [size if shard else None for shard in index.column("shard").to_pylist()]
                    index = index.set_column(index.schema.get_field_index("shard_size"), "shard_size",
                                             pa.array(sizes, pa.int64()))
            tmp, _ = self.stage(lambda tmp: pq.write_table(index, tmp), ".parquet")
            staged.append((tmp, f"{self.index}/{name}.parquet"))
        except BaseException:
            self.discard(staged)
            raise
        return staged

    def commit(self, name: str, samples: list[dict[str, bytes | str]], index: pa.Table) -> None:
        """Write the shard (if any sample is kept) and then its index, each atomically; the index records the
        shard's size."""
        staged = self.stage_commit(name, samples, index)
        try:
            self.publish(staged)
        except BaseException:
            self.discard(staged)
            raise

    def write_json(self, name: str, obj: Any) -> None:
        def dump(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, sort_keys=True, default=str)

        self.write_file(f"{self.root}/{name}", dump, ".json")

    def read_json(self, name: str) -> Any:
        """A JSON file under the root, or None when it does not exist."""
        try:
            with self.fs.open(f"{self.root}/{name}", "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def put_table(self, subdir: str, name: str, table: pa.Table) -> None:
        """Commit ``<root>/<subdir>/<name>.parquet`` atomically (used for persisted embeddings)."""
        self._ensure_layout()
        directory = self.root if subdir in ("", ".") else f"{self.root}/{subdir}"
        if not self.remote:
            os.makedirs(directory, exist_ok=True)
        self.write_file(f"{directory}/{name}.parquet", lambda tmp: pq.write_table(table, tmp), ".parquet")

    def parquet_files(self, subdir: str) -> list[str]:
        """The parquet files of ``<root>/<subdir>``, sorted."""
        directory = self.root if subdir in ("", ".") else f"{self.root}/{subdir}"
        self.fs.invalidate_cache()
        return self._list(directory, ".parquet")

    def read_tables(self, subdir: str, columns: list[str] | None, *, skip_damaged: bool = False) -> pa.Table:
        """All parquet files of ``<root>/<subdir>`` concatenated (an empty table when there are none); a damaged
        file raises :class:`DamagedFile`, or is skipped with a warning."""
        tables = self._read_each(self.parquet_files(subdir), columns, skip_damaged)
        if not tables:
            return pa.table({c: pa.array([], pa.string()) for c in (columns or ["key"])})
        return pa.concat_tables(tables, promote_options="default")

    def _ensure_layout(self) -> None:
        if not self.remote and self.tmp and not os.path.isdir(self.tmp):
            os.makedirs(self.tmp, exist_ok=True)


@contextlib.contextmanager
def _named(path: str):
    """OSErrors of writes (disk full, quota) name the file, so the user's one line says where."""
    try:
        yield
    except OSError as exc:
        if exc.filename or exc.errno is None:
            raise
        raise WriteError(exc.errno, exc.strerror or os.strerror(exc.errno), path) from exc


class WriteError(OSError):
    """An OSError that keeps its errno and path through Ray: Ray Data rewrites a task exception's ``args``
    before pickling it, which loses both from a plain OSError."""

    def __init__(self, errno: int, strerror: str, path: str):
        super().__init__(errno, strerror, path)
        self._saved = (errno, strerror, path)

    def __reduce__(self):
        return type(self), self._saved


class StoreUnavailable(RuntimeError):
    """The store kept failing (HTTP 5xx, timeouts, resets) or refused (credentials, access) while reading the
    output: not damage, so nothing is quarantined; the run stops with this one line. Keeps its message through
    Ray (see :class:`WriteError`)."""

    def __reduce__(self):
        return type(self), (str(self),)


def store_unavailable(path: str, exc: BaseException, what: str = "a read") -> StoreUnavailable:
    """The one line for a store that failed ``what`` of ``path``: retried and still failing (5xx, timeouts), or
    refusing (credentials, access). Either way nothing was changed."""
    cause = exc.__cause__ if isinstance(exc, StoreReadError) and exc.__cause__ is not None else exc
    name, first = cause.__class__.__name__, _first_line(cause)
    if is_transient(cause):
        return StoreUnavailable(f"{path}: the store did not answer {what} ({name}: {first}); nothing was "
                                f"changed, rerun later")
    return StoreUnavailable(f"{path}: the store refused {what} ({name}: {first}); nothing was changed, fix the "
                            f"store's access or credentials and rerun")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


class DamagedFile(OSError):
    """A file of the output that cannot be read as what it should be; its message names it."""

    def __init__(self, path: str, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_name(keys: Iterable[str]) -> str:
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def to_sample(row: dict[str, Any], output: OutputConfig) -> dict[str, bytes | str]:
    """The tar members of a kept row: image, json metadata, prompt and optionally the inputs."""
    ext = "jpg" if output.image_format == "jpeg" else output.image_format
    ids = stored_row({"content_id": row["content_id"], "style_id": row["style_id"]})  # no URL credential in an id
    meta = {
        "key": row["key"],
        "prompt": row["prompt"],
        "content_id": ids["content_id"],
        "style_id": ids["style_id"],
        "seed": row["seed"],
        "clip_content": row["clip_content"],
        "clip_style": row["clip_style"],
        "operator": json.loads(row["meta"]) if row.get("meta") else None,
    }
    meta.update(head_scores(row))
    sample: dict[str, bytes | str] = {
        "__key__": row["key"],
        ext: row["image"],
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
        "txt": (row["prompt"] or "").encode("utf-8"),
    }
    if output.include_inputs:
        if row.get("style_bytes"):
            sample["style.png"] = row["style_bytes"]
        if row.get("content_bytes"):
            sample["content.png"] = row["content_bytes"]
    return sample


def head_scores(row: dict[str, Any]) -> dict[str, float]:
    """``{score_<head>: value}`` of a row's quality heads (its ``scores`` JSON); empty without heads."""
    raw = row.get("scores")
    return {f"{SCORE_PREFIX}{k}": v for k, v in sorted(json.loads(raw).items())} if raw else {}


def stored_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as it may be stored: source URLs without credentials, reasons and ids without URL credentials or
    secret values (pipeline.redact). A redacted URL cannot be re-read; report and reproduce say so."""
    from pipeline.redact import redact_text, redact_url

    out = dict(row)
    for name in ("content_url", "style_url"):
        if out.get(name):
            out[name] = redact_url(out[name])
    for name in ("reason", "content_id", "style_id"):
        if out.get(name):
            out[name] = redact_text(out[name])
    return out


def index_rows(rows: list[dict[str, Any]], shard: str | None) -> pa.Table:
    out = []
    for row in rows:
        record = stored_row({name: row.get(name) for name in INDEX_SCHEMA.names})
        record["shard"] = shard if row["status"] == "kept" else None
        record.update(head_scores(row))
        out.append(record)
    extra = sorted({c for r in out for c in r} - set(INDEX_SCHEMA.names))
    schema = pa.schema(list(INDEX_SCHEMA) + [index_field(c) for c in extra])
    return pa.Table.from_pylist(out, schema=schema)


def commit_rows(store: OutputStore, rows: list[dict[str, Any]], output: OutputConfig,
                make_sample: Callable[[dict[str, Any], OutputConfig], dict[str, bytes | str]] | None = None,
                ) -> dict[str, int]:
    """Split rows (in key order) into even shards of ``samples_per_shard`` to ``2*samples_per_shard - 1``
    rows (fewer only when fewer rows are left) and commit each. ``make_sample`` builds a kept row's tar
    members (default :func:`to_sample`; ``stylegen filter`` copies the original members instead).

    Shard k+1 is staged while shard k is published (fsynced and renamed, or uploaded) on a background thread, in
    order (:class:`~pipeline.output.publish.Publisher`); every publication has ended when this returns, and the
    first failure is raised with its file named, nothing after it published."""
    make_sample = make_sample or to_sample
    rows = sorted(rows, key=lambda r: r["key"])
    counts = {"kept": 0, "rejected": 0, "failed": 0, "shards": 0}
    n_chunks = max(1, len(rows) // output.samples_per_shard)
    bounds = [round(i * len(rows) / n_chunks) for i in range(n_chunks + 1)]
    with Publisher() as publisher:
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            if publisher.failed:
                break  # close() raises the failure
            chunk = rows[lo:hi]
            name = shard_name(r["key"] for r in chunk)
            kept = [r for r in chunk if r["status"] == "kept"]
            staged = store.stage_commit(name, [make_sample(r, output) for r in kept],
                                        index_rows(chunk, f"{name}.tar" if kept else None))
            publisher.submit(lambda staged=staged: store.publish(staged), lambda staged=staged: store.discard(staged))
            for r in chunk:
                counts[r["status"]] = counts.get(r["status"], 0) + 1
            counts["shards"] += 1 if kept else 0
    return counts
