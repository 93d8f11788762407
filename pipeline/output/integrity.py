"""Damage found, never ignored: checks of the output contract, quarantine, and superseding rows
(docs/architecture.md §5.5).

:func:`check` lists every problem of an output with the file it concerns: an index file that cannot be read, a
key in two index files, a kept row whose shard is missing, of another size than the index recorded, unreadable,
or holding other keys than the kept ones, a shard with a member name that is not ``<16 hex>.<portable ext>`` or
whose members are not grouped by key, and stray files (orphan shards, staged leftovers, foreign files in
``shards/`` and ``index/``). ``deep=False`` is the cheap start-up form of ``run`` and ``filter`` (a listing and
the index columns, no tar is read); ``stylegen verify`` reads every tar.

:func:`repair` moves the files of each problem to ``OUTPUT/_quarantine/<stamp>/`` (never deletes), shard first
and index last, so that the samples they held are no longer done and the next run redoes them.
:func:`startup_repair` does the same at the start of ``run``/``filter`` (orphan shards of a crash included), but
stops with one line and moves nothing when more than half of the shards would go: that is not a crash but a
partial copy (``shards/`` without ``index/``) or someone else's files. A store that does not answer (HTTP 5xx,
timeouts) is not damage: :class:`~pipeline.output.store.StoreUnavailable` stops the run and nothing is moved.

:func:`supersede` takes rows out of the index for ``--retry-failed``: the file that held them is copied to
``OUTPUT/_superseded/<stamp>/`` and rewritten without them, so ``index/`` keeps exactly one row per key for any
reader (plain pyarrow included) and the history stays on storage.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.fs import StoreReadError, open_store_file, retry_transient
from pipeline.io.members import output_name_problem, shown
from pipeline.io.tar_index import TarIndex, index_open_tar
from pipeline.output.ownership import NotOurs
from pipeline.output.store import DamagedFile, OutputStore, StoreUnavailable, store_unavailable
from pipeline.schema import conform_index

log = logging.getLogger(__name__)

QUARANTINE = "_quarantine"
SUPERSEDED = "_superseded"
CHECK_COLUMNS = ["key", "status", "shard", "shard_size"]
stem = OutputStore.stem  # a shard and its index file share the stem


@dataclass
class Problem:
    path: str  # the file the problem concerns
    what: str
    quarantine: list[str] = field(default_factory=list)  # what repair moves away, in this order
    orphan: bool = False  # a shard without its index file (a crash before the commit)

    def line(self) -> str:
        return f"{self.path}: {self.what}"


def _sizes(store: OutputStore, directory: str) -> dict[str, int]:
    def listing() -> dict[str, int]:
        return {e["name"]: int(e.get("size") or 0) for e in store.fs.ls(directory, detail=True)
                if e.get("type") != "directory"}

    try:
        return retry_transient(listing, what=directory) if store.remote else listing()
    except FileNotFoundError:
        return {}
    except Exception as exc:  # a listing that fails says nothing about the files: never damage
        raise store_unavailable(directory, exc, "a listing") from None


def check(store: OutputStore, *, deep: bool = True) -> list[Problem]:
    """Every problem of the output at ``store``, in a stable order. Index files are checked one by one (as Ray
    tasks when Ray is initialised) and keys repeated across files are found by a groupby on the cluster: the
    driver holds per-file results and the repeats, never the set of keys."""
    store.fs.invalidate_cache()
    problems: list[Problem] = []
    shard_sizes = _sizes(store, store.shards)
    index_paths = sorted(_sizes(store, store.index))
    for path in index_paths:
        if not path.endswith(".parquet"):
            problems.append(Problem(path, "stray file in index/ (not a parquet index file)", [path]))
    for path in sorted(shard_sizes):
        if not path.endswith(".tar"):
            problems.append(Problem(path, "stray file in shards/ (not a tar shard)", [path]))
    index_paths = [p for p in index_paths if p.endswith(".parquet")]
    stems = {stem(p) for p in index_paths}
    jobs = [(path, shard_sizes.get(f"{store.shards}/{stem(path)}.tar")) for path in index_paths]
    per_file = dict(_map_chunks(_check_index_files, store.url, jobs, deep))  # path -> (problem, keys usable)
    repeats = _repeated_keys(store, [p for p in index_paths if per_file[p][1]])
    for path in index_paths:
        if path in repeats:
            n, key, other = repeats[path]
            shard = f"{store.shards}/{stem(path)}.tar"
            problems.append(Problem(path, f"{n} keys are indexed twice, e.g. {key} (also in {other})",
                                    [*([shard] if shard in shard_sizes else []), path]))
        elif per_file[path][0] is not None:
            problems.append(per_file[path][0])
    for path in sorted(p for p in shard_sizes if p.endswith(".tar") and stem(p) not in stems):
        problems.append(Problem(path, "orphan shard without an index file (a crash before its commit, or a commit "
                                      "in progress)", [path], orphan=True))
    if store.tmp and os.path.isdir(store.tmp):
        for name in sorted(os.listdir(store.tmp)):
            path = f"{store.tmp}/{name}"
            problems.append(Problem(path, "staged file left behind by a crashed write", [path]))
    return problems


CHUNK = 64  # index files per Ray task


def _unwrapped(get):
    """``get()``, with a worker's :class:`StoreUnavailable` raised as itself (its one line), not as Ray's
    multi-line task error."""
    try:
        return get()
    except Exception as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, StoreUnavailable):
            raise StoreUnavailable(str(cause)) from None
        raise


def _map_chunks(fn, url: str, jobs: list, *args) -> list:
    """``fn(url, chunk, *args)`` over chunks of ``jobs``: Ray tasks when Ray is initialised, else in-process."""
    import ray

    chunks = [jobs[i:i + CHUNK] for i in range(0, len(jobs), CHUNK)]
    if ray.is_initialized() and chunks:  # the driver reads no index file itself
        task = ray.remote(num_cpus=1)(fn)
        parts = _unwrapped(lambda: ray.get([task.remote(url, chunk, *args) for chunk in chunks]))
        return [r for part in parts for r in part]
    return [r for chunk in chunks for r in fn(url, chunk, *args)]


def _check_index_files(url: str, jobs: list[tuple[str, int | None]], deep: bool) -> list[tuple[str, tuple]]:
    store = OutputStore(url)
    return [(path, _check_index_file(store, path, size, deep)) for path, size in jobs]


def _check_index_file(store: OutputStore, path: str, shard_size: int | None,
                      deep: bool) -> tuple[Problem | None, bool]:
    """The problem of one index file, and whether its keys count as indexed (for the check across files)."""
    shard = f"{store.shards}/{stem(path)}.tar"
    shard_files = [shard] if shard_size is not None else []
    try:
        table = conform_index(store.read_parquet(path, None), None).select(CHECK_COLUMNS)
    except DamagedFile as exc:
        return Problem(path, f"index file {exc.why}", [*shard_files, path]), False
    keys = table.column("key")
    repeated = len(keys) - pc.count_distinct(keys).as_py()
    if repeated:
        counts = pc.value_counts(keys)
        example = counts.field("values")[pc.index(counts.field("counts"), pc.max(counts.field("counts"))).as_py()]
        return Problem(path, f"{repeated} keys are indexed twice, e.g. {example}", [*shard_files, path]), False
    return _check_shard(store, path, table, shard, shard_size, deep), True


SMALL_INDEX = 2_000  # index files whose keys one worker checks for repeats; above it, a groupby on the cluster


def _repeated_keys(store: OutputStore, paths: list[str]) -> dict[str, tuple[int, str, str]]:
    """Index files holding keys that an earlier file (in path order) holds too: path -> (how many, an example
    key, the earlier file). The keys are read by a worker (one for a small index, a groupby for a large one),
    never by the driver; ``verify`` without Ray reads them in its own process."""
    if len(paths) < 2:
        return {}
    import ray

    if not ray.is_initialized():
        return _repeats_in(store.url, paths)
    if len(paths) <= SMALL_INDEX:
        return _unwrapped(lambda: ray.get(ray.remote(num_cpus=1)(_repeats_in).remote(store.url, paths)))
    from ray.data.aggregate import Count

    from pipeline.io.fs import arrow_fs

    ds = ray.data.read_parquet(paths, filesystem=arrow_fs(store.fs), include_paths=True, columns=["key"])
    ds = ds.select_columns(["key", "path"])
    repeated = {r["key"] for r in ds.groupby("key").aggregate(Count()).filter(fn=lambda r: r["count()"] > 1)
                .take_all()}
    rows = ds.filter(fn=lambda r: r["key"] in repeated).take_all() if repeated else []
    return _later_holders((_full(store, r["path"]), r["key"]) for r in rows)


def _repeats_in(url: str, paths: list[str]) -> dict[str, tuple[int, str, str]]:
    store = OutputStore(url)
    return _later_holders((path, key) for path in paths
                          for key in store.read_parquet(path, ["key"]).column("key").to_pylist())


def _later_holders(holders) -> dict[str, tuple[int, str, str]]:
    first: dict[str, str] = {}
    out: dict[str, tuple[int, str, str]] = {}
    for path, key in sorted(holders):
        if key not in first:
            first[key] = path
        elif first[key] != path:
            n, example, other = out.get(path, (0, key, first[key]))
            out[path] = (n + 1, example, other)
    return out


def _full(store: OutputStore, path: str) -> str:
    """A path as Ray's reader reports it, in the form the listing uses."""
    name = path.rsplit("/", 1)[-1]
    return f"{store.index}/{name}"


def _check_shard(store: OutputStore, index_path: str, table: pa.Table, shard: str, actual: int | None,
                 deep: bool) -> Problem | None:
    """The problem of one index file's shard, if any: the tar must hold exactly its kept keys."""
    rows = table.to_pylist()
    kept = {r["key"] for r in rows if r["status"] == "kept"}
    bad_status = [r for r in rows if r["status"] not in ("kept", "rejected", "failed")]
    if bad_status:
        return Problem(index_path, f"unknown status {bad_status[0]['status']!r} for key {bad_status[0]['key']}",
                       [index_path])
    name = shard.rsplit("/", 1)[-1]
    elsewhere = sorted({r["shard"] for r in rows if r["status"] == "kept" and r["shard"] != name})
    if elsewhere:
        return Problem(index_path, f"kept rows point at {elsewhere[0]}, not at {name}", [index_path])
    if not kept:
        return Problem(shard, "shard whose index lists no kept sample", [shard]) if actual is not None else None
    if actual is None:
        return Problem(index_path, f"shard {shard} is missing ({len(kept)} kept samples)", [index_path])
    recorded = {r["shard_size"] for r in rows if r["status"] == "kept"} - {None}
    if recorded and actual not in recorded:
        return Problem(shard, f"shard is {actual} bytes, the index recorded {min(recorded)} (truncated or "
                              f"replaced)", [shard, index_path])
    if not deep:
        return None
    names: list[str] = []

    def index() -> TarIndex:
        names.clear()
        with open_store_file(store.fs, shard) as f:
            return index_open_tar(f, shard, names)

    try:
        tar = retry_transient(index, what=shard) if store.remote else index()
    except StoreReadError as exc:  # the store failed the read: not evidence about the shard
        raise store_unavailable(shard, exc) from None
    except Exception as exc:  # not a tar at all
        return Problem(shard, f"unreadable tar ({exc.__class__.__name__}: {exc})", [shard, index_path])
    broken = tar.truncated or next((s.error for s in tar.samples if s.error), None)
    if broken:
        return Problem(shard, f"damaged tar ({broken})", [shard, index_path])
    keys = {s.key for s in tar.samples}
    if keys != kept:
        return Problem(shard, f"tar holds {len(keys - kept)} keys not kept in its index and lacks "
                              f"{len(kept - keys)} kept keys", [shard, index_path])
    why = member_names_problem(names)
    return Problem(shard, why, [shard, index_path]) if why else None


def member_names_problem(names: list[str]) -> str | None:
    """What is wrong with a shard's member names (in archive order), if anything: a name that is not
    ``<16 hex>.<portable ext>`` (``pipeline.io.members``), or the members of one key not next to each other (a
    WebDataset reader would split that sample in two)."""
    seen: set[str] = set()
    previous = None
    for name in names:
        why = output_name_problem(name)
        if why:
            return f"unsafe member name {shown(name)!r} ({why})"
        key = name.partition(".")[0]
        if key != previous:
            if key in seen:
                return f"members not grouped by key: {key} appears again after other keys"
            seen.add(key)
            previous = key
    return None


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"


def move_aside(store: OutputStore, paths: list[str], folder: str, stamp: str) -> list[str]:
    """Move files of the output to ``ROOT/<folder>/<stamp>/<their path under ROOT>``; never deletes."""
    moved = []
    for path in paths:
        rel = path[len(store.root):].lstrip("/") if path.startswith(store.root) else path.rsplit("/", 1)[-1]
        target = f"{store.root}/{folder}/{stamp}/{rel}"
        if not store.fs.exists(path):
            continue
        if store.remote:
            store.fs.mv(path, target)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(path, target)
        moved.append(target)
    store.fs.invalidate_cache()
    return moved


def repair(store: OutputStore, problems: list[Problem]) -> list[str]:
    """Quarantine the files of every problem (log one line each); return where they went."""
    stamp = _stamp()
    moved = []
    for problem in problems:
        targets = move_aside(store, problem.quarantine, QUARANTINE, stamp)
        if targets:
            log.warning("repair: %s -> moved to %s/%s/%s; its samples will be redone", problem.line(), store.url,
                        QUARANTINE, stamp)
        moved.extend(targets)
    return moved


# A crash leaves at most one orphan per write in flight; more than this many shards to quarantine, and more than
# half of all shards, is not a crash (a copy of shards/ alone, or files stylegen did not write).
ORPHAN_ALLOWANCE = 8


def startup_repair(store: OutputStore) -> tuple[int, int]:
    """The cheap checks at the start of ``run``/``filter`` (under the lease, after :meth:`OutputStore.prepare`):
    quarantines what they find and returns ``(orphan shards, other problems)``. Raises :class:`NotOurs` with
    nothing moved when most of the shards would be quarantined."""
    problems = check(store, deep=False)
    shards = [p for p in _sizes(store, store.shards) if p.endswith(".tar")]
    doomed = {path for p in problems for path in p.quarantine if path.startswith(f"{store.shards}/")}
    if len(doomed) > max(ORPHAN_ALLOWANCE, len(shards) / 2):
        example = next(p for p in problems if any(q in doomed for q in p.quarantine))
        raise NotOurs(f"output.path: {store.url}: {len(doomed)} of {len(shards)} shards would be quarantined "
                      f"(e.g. {example.line()}); not a crash to repair, so nothing was moved: is this a partial copy "
                      f"of an output? See `stylegen verify {store.url}`")
    repair(store, problems)
    orphans = sum(p.orphan for p in problems)
    return orphans, len(problems) - orphans


def supersede(store: OutputStore, subdir: str, drop: Callable[[pa.Table], pa.Array]) -> list[str]:
    """Take the rows where ``drop(table)`` is true out of every parquet file of ``ROOT/<subdir>``: the file is
    first copied to ``_superseded/<stamp>/``, then rewritten without them (or moved there whole when nothing is
    left). Returns the keys taken out."""
    stamp = _stamp()
    directory = store.root if subdir in ("", ".") else f"{store.root}/{subdir}"
    taken: list[str] = []
    for path in sorted(p for p in _sizes(store, directory) if p.endswith(".parquet")):
        table = store.read_parquet(path)
        mask = drop(table)
        if not pc.any(mask).as_py():
            continue
        taken.extend(table.filter(mask).column("key").to_pylist())
        rest = table.filter(pc.invert(mask))
        if rest.num_rows == 0:
            move_aside(store, [path], SUPERSEDED, stamp)
            continue
        rel = path[len(store.root):].lstrip("/")
        target = f"{store.root}/{SUPERSEDED}/{stamp}/{rel}"
        if not store.remote:
            os.makedirs(os.path.dirname(target), exist_ok=True)
        store.fs.copy(path, target)
        store.write_file(path, lambda tmp, rest=rest: pq.write_table(rest, tmp), ".parquet")
    store.fs.invalidate_cache()
    return taken


def failed_mask(substring: str | None) -> Callable[[pa.Table], pa.Array]:
    """Rows of the index with status ``failed`` (and, given, a reason containing ``substring``)."""

    def mask(table: pa.Table) -> pa.Array:
        failed = pc.equal(table.column("status"), "failed")
        if substring:
            failed = pc.and_(failed, pc.fill_null(pc.match_substring(table.column("reason"), substring), False))
        return pc.fill_null(failed, False)

    return mask


def quarantine_unreadable(store: OutputStore, subdir: str) -> int:
    """Quarantine every parquet file of ``ROOT/<subdir>`` that cannot be read (the embeddings store's start-up
    check, on Ray tasks when Ray is initialised); returns how many."""
    directory = store.root if subdir in ("", ".") else f"{store.root}/{subdir}"
    paths = sorted(p for p in _sizes(store, directory) if p.endswith(".parquet"))
    problems = [Problem(path, why, [path]) for path, why in _map_chunks(_unreadable, store.url, paths)]
    repair(store, problems)
    return len(problems)


def _unreadable(url: str, paths: list[str]) -> list[tuple[str, str]]:
    store = OutputStore(url)
    found = []
    for path in paths:
        try:
            store.read_parquet(path, ["key"])
        except DamagedFile as exc:
            found.append((path, exc.why))
    return found


def open_output(store: OutputStore, retry_failed: str | None) -> dict[str, int]:
    """Start-up under the lease: orphans and damage quarantined (never deleted), and with ``retry_failed`` (a
    reason substring, "" for all) the failed rows superseded so that their samples are planned again.
    ``orphans_removed`` counts the orphan shards moved to ``_quarantine/``."""
    store.prepare()
    orphans, repaired = startup_repair(store)
    counts = {"orphans_removed": orphans, "repaired": repaired, "retried": 0}
    if retry_failed is not None:
        counts["retried"] = len(supersede(store, "index", failed_mask(retry_failed)))
        log.info("retrying %d failed samples%s", counts["retried"],
                 f" whose reason contains {retry_failed!r}" if retry_failed else "")
    return counts
