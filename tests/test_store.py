"""pipeline.output.store: shard + index commits, idempotence, shard sizes, crash recovery (docs/architecture.md §5)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.config import OutputConfig
from pipeline.output.store import OutputStore, commit_rows, shard_name
from pipeline.schema import ROW_SCHEMA
from tests.unit_helpers import solid_png

STATUSES = ("kept", "rejected", "failed")


def make_rows(n: int, statuses=STATUSES, tag: str = "") -> list[dict]:
    rows = []
    for i in range(n):
        status = statuses[i % len(statuses)]
        key = hashlib.sha1(f"row{tag}{i}".encode()).hexdigest()[:16]
        row = {name: None for name in ROW_SCHEMA.names}
        row.update(
            key=key,
            status=status,
            reason=None if status == "kept" else f"{status} because {i}",
            prompt=f"prompt number {i}",
            content_id=f"content/{i}.jpg",
            style_id=f"style/{i % 3}.png",
            seed=1000 + i,
            clip_content=0.1 + i / 100,
            clip_style=0.2 + i / 100,
            meta=json.dumps({"operator": "color-transfer", "i": i}),
            style_bytes=solid_png((0, 0, 10 * i % 256), (4, 4)),
            content_bytes=solid_png((0, 10 * i % 256, 0), (4, 4)),
            image=solid_png((10 * i % 256, 0, 0), (6, 6)) if status == "kept" else None,
        )
        rows.append(row)
    return rows


def output(path: Path, **kw) -> OutputConfig:
    return OutputConfig(path=str(path), **kw)


def store_at(path: Path) -> OutputStore:
    store = OutputStore(str(path))
    store.prepare()
    return store


def tar_members(path: str) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def read_index(store: OutputStore) -> list[dict]:
    return store.read_index().to_pylist()


def test_commit_rows_tar_keys_are_exactly_the_kept_keys(tmp_path):
    rows = make_rows(9)
    store = store_at(tmp_path)
    counts = commit_rows(store, rows, output(tmp_path, samples_per_shard=100))
    assert counts["kept"] == 3 and counts["rejected"] == 3 and counts["failed"] == 3
    kept = {r["key"] for r in rows if r["status"] == "kept"}
    (shard,) = store.shard_files()
    keys = {name.split(".", 1)[0] for name in tar_members(shard)}
    assert keys == kept


def test_every_row_appears_once_in_the_index(tmp_path):
    rows = make_rows(10)
    store = store_at(tmp_path)
    commit_rows(store, rows, output(tmp_path, samples_per_shard=4))
    index = read_index(store)
    assert sorted(r["key"] for r in index) == sorted(r["key"] for r in rows)
    by_key = {r["key"]: r for r in rows}
    shard_names = {os.path.basename(p) for p in store.shard_files()}
    for rec in index:
        src = by_key[rec["key"]]
        for col in ("status", "reason", "prompt", "content_id", "style_id", "seed", "clip_content", "clip_style"):
            assert rec[col] == src[col], col
        if rec["status"] == "kept":
            assert rec["shard"] in shard_names
        else:
            assert rec["shard"] is None
    assert store.done_keys() == set(by_key)


def test_commit_is_idempotent_and_byte_identical(tmp_path):
    rows = make_rows(7)
    out = output(tmp_path / "a", samples_per_shard=100)
    store = store_at(tmp_path / "a")
    commit_rows(store, rows, out)
    first = {p: Path(p).read_bytes() for p in store.shard_files()}

    commit_rows(store, list(reversed(rows)), out)  # a retried write, rows in another order
    assert {p: Path(p).read_bytes() for p in store.shard_files()} == first
    assert len(store.index_files()) == 1

    other = store_at(tmp_path / "b")  # another output place: same names, same bytes
    commit_rows(other, rows, output(tmp_path / "b", samples_per_shard=100))
    assert [Path(p).read_bytes() for p in other.shard_files()] == list(first.values())
    assert [os.path.basename(p) for p in other.shard_files()] == [os.path.basename(p) for p in first]


def test_shard_name_is_sha1_of_sorted_keys(tmp_path):
    rows = make_rows(6)
    store = store_at(tmp_path)
    commit_rows(store, rows, output(tmp_path, samples_per_shard=100))
    keys = sorted(r["key"] for r in rows)
    expected = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]
    assert shard_name(keys) == shard_name(reversed(keys)) == expected
    assert [os.path.basename(p) for p in store.shard_files()] == [f"{expected}.tar"]
    assert [os.path.basename(p) for p in store.index_files()] == [f"{expected}.parquet"]
    assert shard_name(keys[:-1]) != expected


@pytest.mark.parametrize(
    ("n_rows", "per_shard", "sizes"),
    [(10, 4, [5, 5]), (3, 4, [3]), (8, 4, [4, 4]), (11, 4, [5, 6]), (7, 4, [7]), (12, 4, [4, 4, 4]), (1, 1, [1])],
)
def test_shard_sizes_follow_the_even_split(tmp_path, n_rows, per_shard, sizes):
    rows = make_rows(n_rows, statuses=("kept",))
    store = store_at(tmp_path)
    counts = commit_rows(store, rows, output(tmp_path, samples_per_shard=per_shard))
    got = sorted(len(tar_members(p)) // 3 for p in store.shard_files())  # png + json + txt per sample
    assert got == sorted(sizes)
    assert counts["shards"] == len(sizes)
    assert all(per_shard <= s < 2 * per_shard for s in got) or n_rows < per_shard
    # rows are split in key order: every shard holds a contiguous run of the sorted keys
    ordered = sorted(r["key"] for r in rows)
    for p in store.shard_files():
        keys = sorted({m.split(".", 1)[0] for m in tar_members(p)})
        start = ordered.index(keys[0])
        assert ordered[start: start + len(keys)] == keys


def test_chunk_without_kept_rows_writes_only_the_index(tmp_path):
    rows = make_rows(5, statuses=("rejected", "failed"))
    store = store_at(tmp_path)
    counts = commit_rows(store, rows, output(tmp_path, samples_per_shard=10))
    assert counts["shards"] == 0
    assert store.shard_files() == []
    assert len(store.index_files()) == 1
    index = read_index(store)
    assert len(index) == 5 and all(r["shard"] is None for r in index)


def test_startup_quarantines_orphans_and_clears_tmp(tmp_path):
    from pipeline.output.integrity import open_output

    store = store_at(tmp_path)
    commit_rows(store, make_rows(4), output(tmp_path, samples_per_shard=100))
    committed_tar, committed_index = store.shard_files(), store.index_files()
    assert len(committed_tar) == 1 and len(committed_index) == 1

    orphan = tmp_path / "shards" / "0123456789abcdef.tar"  # tar whose index never landed
    orphan.write_bytes(Path(committed_tar[0]).read_bytes())
    (tmp_path / "_tmp" / "half-written.parquet").write_bytes(b"partial")

    opened = open_output(OutputStore(str(tmp_path)), None)
    assert opened["orphans_removed"] == 1
    assert not orphan.exists()  # moved aside, never deleted
    assert [p.read_bytes() for p in tmp_path.glob("_quarantine/*/shards/0123456789abcdef.tar")] == \
        [Path(committed_tar[0]).read_bytes()]
    assert os.listdir(tmp_path / "_tmp") == []
    assert store.shard_files() == committed_tar and store.index_files() == committed_index


def test_tars_read_with_tarfile_and_webdataset(tmp_path):
    rows = make_rows(6)
    store = store_at(tmp_path)
    commit_rows(store, rows, output(tmp_path, samples_per_shard=100))
    (shard,) = store.shard_files()
    kept = {r["key"]: r for r in rows if r["status"] == "kept"}

    names = tar_members(shard)
    assert sorted(names) == sorted(f"{k}.{ext}" for k in kept for ext in ("png", "json", "txt"))
    with tarfile.open(shard) as tar:
        for info in tar.getmembers():
            assert info.isfile() and info.mtime == 0
            assert ".." not in info.name and "/" not in info.name

    samples = list(wds.WebDataset(shard, shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(kept)
    for sample in samples:
        row = kept[sample["__key__"]]
        assert sample["png"] == row["image"]
        Image.open(io.BytesIO(sample["png"])).verify()
        assert sample["txt"].decode() == row["prompt"]
        meta = json.loads(sample["json"])
        assert meta["key"] == row["key"]
        assert meta["seed"] == row["seed"]
        assert meta["clip_content"] == pytest.approx(row["clip_content"])
        assert meta["clip_style"] == pytest.approx(row["clip_style"])
        assert meta["prompt"] == row["prompt"] and meta["style_id"] == row["style_id"]
        assert "style.png" not in sample and "content.png" not in sample


def test_include_inputs_adds_style_member(tmp_path):
    rows = make_rows(3, statuses=("kept",))
    store = store_at(tmp_path)
    commit_rows(store, rows, output(tmp_path, samples_per_shard=100, include_inputs=True))
    (shard,) = store.shard_files()
    samples = {s["__key__"]: s for s in wds.WebDataset(shard, shardshuffle=False)}
    assert set(samples) == {r["key"] for r in rows}
    for row in rows:
        assert samples[row["key"]]["style.png"] == row["style_bytes"]
        assert samples[row["key"]]["content.png"] == row["content_bytes"]
    with tarfile.open(shard) as tar:
        assert f"{rows[0]['key']}.style.png" in tar.getnames()


def test_jpeg_output_format_uses_jpg_member(tmp_path):
    rows = make_rows(2, statuses=("kept",))
    store = store_at(tmp_path)
    commit_rows(store, rows, output(tmp_path, samples_per_shard=100, image_format="jpeg"))
    (shard,) = store.shard_files()
    assert sorted(n.split(".", 1)[1] for n in tar_members(shard)) == ["jpg", "jpg", "json", "json", "txt", "txt"]


def test_index_parquet_is_readable_on_its_own(tmp_path):
    rows = make_rows(5)
    store = store_at(tmp_path)
    commit_rows(store, rows, output(tmp_path, samples_per_shard=100))
    (path,) = store.index_files()
    table = pq.read_table(path)
    for col in ("key", "status", "reason", "shard", "prompt", "content_id", "style_id", "seed",
                "clip_content", "clip_style"):
        assert col in table.column_names
    assert set(table.column("status").to_pylist()) == set(STATUSES)


def test_tar_bytes_are_tarfiles_own(tmp_path):
    """The writer fills a header template instead of calling tarfile per member: the bytes must be tarfile's."""
    from pipeline.output.tars import member_info, write_tar

    samples = [{"__key__": f"{i:016x}", "png": os.urandom(i * 517 % 3000), "json": "é" * i, "txt": b"",
                "style.png": b"x" * 512, "a" * 32: b"y" * 70_000} for i in range(9)]
    ours = io.BytesIO()
    write_tar(ours, list(reversed(samples)))
    theirs = io.BytesIO()
    with tarfile.open(fileobj=theirs, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext in sorted(k for k in sample if k != "__key__"):
                data = sample[ext].encode() if isinstance(sample[ext], str) else sample[ext]
                tar.addfile(member_info(f"{sample['__key__']}.{ext}", len(data)), io.BytesIO(data))
    assert ours.getvalue() == theirs.getvalue()


def _chunk_names(rows: list[dict], per_shard: int) -> list[str]:
    """Shard names in commit order, for rows that split into chunks of exactly ``per_shard``."""
    keys = sorted(r["key"] for r in rows)
    return [shard_name(keys[i:i + per_shard]) for i in range(0, len(keys), per_shard)]


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _spy_disk(monkeypatch, on_fsync=None) -> list[tuple]:
    """Record the commit's fsyncs and renames, in order: ("fsync", path) and ("replace", src, dst)."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        path = _fd_path(fd)
        if on_fsync is not None:
            on_fsync(path)
        real_fsync(fd)
        events.append(("fsync", path))

    def replace(src, dst):
        real_replace(src, dst)
        events.append(("replace", str(src), str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_each_index_is_published_only_after_its_tar_is_durable_and_visible(tmp_path, monkeypatch):
    """§5.3 with publication in the background: per shard, tar fsynced -> renamed -> shards/ fsynced, and only
    then index fsynced -> renamed -> index/ fsynced; shards in key order."""
    store = store_at(tmp_path)
    events = _spy_disk(monkeypatch)
    rows = make_rows(12, statuses=("kept", "rejected"))
    commit_rows(store, rows, output(tmp_path, samples_per_shard=3))
    renames = [e for e in events if e[0] == "replace"]
    assert len(renames) == 8  # 4 shards, 4 indexes
    for n, (_, src, dst) in enumerate(renames):
        at = events.index(renames[n])
        before, after = events[:at], events[at + 1:]
        assert ("fsync", src) in before, f"{dst} renamed before its staged file was fsynced"
        assert after and after[0] == ("fsync", os.path.dirname(dst)), f"{dst}: its folder not fsynced next"
        if dst.endswith(".parquet"):
            tar = f"{store.shards}/{Path(dst).stem}.tar"
            assert renames[n - 1][2] == tar and n % 2 == 1, f"{dst} published before its tar"
            assert ("fsync", str(tmp_path / "shards")) in events[events.index(renames[n - 1]):at]
    assert [Path(r[2]).stem for r in renames[::2]] == _chunk_names(rows, 3)


def test_a_tar_that_fails_to_sync_publishes_no_index_and_names_its_file(tmp_path, monkeypatch):
    """An fsync failure (EIO) on the second of three tars: the first shard is committed, the second's tar and
    index and the whole third shard never become visible, nothing stays staged, and the error names the tar."""
    import errno

    from pipeline.output.integrity import open_output
    from pipeline.output.store import WriteError

    store = store_at(tmp_path)
    synced_tars = []

    def fail_second_tar(path):
        if path.endswith(".tar"):
            synced_tars.append(path)
            if len(synced_tars) == 2:
                raise OSError(errno.EIO, "Input/output error")

    _spy_disk(monkeypatch, fail_second_tar)
    rows = make_rows(9, statuses=("kept",))
    with pytest.raises(WriteError) as err:
        commit_rows(store, rows, output(tmp_path, samples_per_shard=3))
    names = _chunk_names(rows, 3)
    assert err.value.errno == errno.EIO and err.value.filename == f"{store.shards}/{names[1]}.tar"
    assert [Path(p).stem for p in store.index_files()] == [names[0]]
    assert [Path(p).stem for p in store.shard_files()] == [names[0]]
    assert os.listdir(tmp_path / "_tmp") == []
    monkeypatch.undo()
    assert open_output(OutputStore(str(tmp_path)), None)["orphans_removed"] == 0
    commit_rows(store, rows, output(tmp_path, samples_per_shard=3))  # the rerun commits the rest
    assert store.done_keys() == {r["key"] for r in rows}


def test_a_tar_is_synced_while_the_next_shard_is_staged(tmp_path, monkeypatch):
    """The overlap itself: the first tar's fsync waits until the second tar is being written. Published inline,
    the wait would run out (the second tar comes only after it) and the test fails."""
    import threading

    import pipeline.output.store as store_module

    second_started = threading.Event()
    overlapped = []
    real_write_tar = store_module.write_tar
    calls = []

    def write_tar(f, samples):
        calls.append(len(samples))
        if len(calls) == 2:
            second_started.set()
        real_write_tar(f, samples)

    def wait_for_second(path):
        if path.endswith(".tar") and not overlapped:
            overlapped.append(second_started.wait(timeout=20))

    monkeypatch.setattr(store_module, "write_tar", write_tar)
    _spy_disk(monkeypatch, wait_for_second)
    store = store_at(tmp_path)
    commit_rows(store, make_rows(6, statuses=("kept",)), output(tmp_path, samples_per_shard=3))
    assert overlapped == [True]
    assert len(store.index_files()) == 2


def test_publisher_raises_the_first_failure_but_an_interrupt_stays_an_interrupt():
    from pipeline.output.publish import Publisher

    ran, discarded = [], []

    def fail():
        raise OSError(5, "first")

    with pytest.raises(OSError, match="first"):
        with Publisher() as publisher:
            publisher.submit(lambda: ran.append(1), lambda: discarded.append(1))
            publisher.submit(fail, lambda: discarded.append(2))
            publisher.submit(lambda: ran.append(3), lambda: discarded.append(3))
            raise ValueError("the caller's later error")
    assert ran == [1] and discarded == [2, 3]

    with pytest.raises(KeyboardInterrupt):
        with Publisher() as publisher:
            publisher.submit(fail, lambda: None)
            raise KeyboardInterrupt


def test_publisher_lets_the_caller_run_at_most_one_job_ahead():
    """Staged shards wait for a slow disk or store in bounded number: submitting job k returns once job k-1 is
    done, so the caller stages k+1 while k publishes, never further ahead."""
    import threading

    from pipeline.output.publish import Publisher

    release, submitted = threading.Event(), []

    def slow():
        assert release.wait(timeout=20)

    with Publisher() as publisher:
        def caller():
            publisher.submit(slow, lambda: None)
            submitted.append(1)
            publisher.submit(lambda: None, lambda: None)
            submitted.append(2)

        thread = threading.Thread(target=caller)
        thread.start()
        thread.join(timeout=1)
        assert submitted == [1]  # job 2 is queued, but its submit waits behind the slow job 1
        release.set()
        thread.join()
    assert submitted == [1, 2]
