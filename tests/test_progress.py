"""Progress lines during a run: counts from committed index files, rate, ETA; off with quiet."""

from __future__ import annotations

import json

from pipeline.output.progress import ProgressReporter
from pipeline.output.store import OutputStore, index_rows


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _commit(store: OutputStore, name: str, statuses: list[str]) -> None:
    rows = [{"key": f"{name}-{i}", "status": s, "reason": None if s == "kept" else "x"}
            for i, s in enumerate(statuses)]
    store.commit(name, [], index_rows(rows, None))


def test_counts_rate_and_eta_from_committed_index_files(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.prepare()
    _commit(store, "before", ["kept"] * 5)  # a previous run's work is not this run's progress
    clock = Clock()
    progress = ProgressReporter(store, planned=20, interval_s=0, clock=clock)
    clock.t += 10
    _commit(store, "a", ["kept", "kept", "rejected", "failed"])
    progress.poll()
    line = progress.line()
    assert line.startswith("progress: written 4/20 (20.0%) kept=2 rejected=1 failed=1")
    assert "0.40 samples/s" in line and "ETA 40s" in line and "elapsed 10s" in line
    _commit(store, "a", ["kept", "kept", "rejected", "failed"])  # a retried write rewrites the same name
    clock.t += 10
    _commit(store, "b", ["kept"] * 16)
    progress.poll()
    line = progress.line()
    assert "written 20/20 (100.0%) kept=18" in line and "ETA 0s" in line and "1.00 samples/s" in line

# The lines a real run logs are checked by tests/test_report.py::test_run_logged_progress.


def test_piped_lines_repeat_an_unchanged_count_only_as_a_heartbeat(tmp_path, caplog):
    """A long first batch must not fill a job log with identical lines (CI saw 18 `written 0/12` lines in 37 s): a
    plain line comes first, whenever the count moved, after a heartbeat's silence, and at the end."""
    store = OutputStore(str(tmp_path / "out"))
    store.prepare()
    clock = Clock()
    progress = ProgressReporter(store, planned=8, interval_s=2, clock=clock, display="lines")
    assert progress.heartbeat_s == 30.0

    def shown() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "pipeline.output.progress"]

    with caplog.at_level("INFO", logger="pipeline.output.progress"):
        for _ in range(14):  # 28 s of ticks at 2 s with nothing written: the first line only
            progress.tick()
            clock.t += 2
        assert [ln.split(" | ")[0] for ln in shown()] == ["progress: written 0/8 (0.0%) kept=0 rejected=0 failed=0"]
        progress.tick()  # 28 s since the first line: still quiet
        clock.t += 2
        progress.tick()  # 30 s: the heartbeat
        assert len(shown()) == 2 and "elapsed 30s" in shown()[-1]
        _commit(store, "a", ["kept", "failed"])
        clock.t += 2
        progress.tick()  # the count moved: shown at once
        progress.tick()  # unchanged again: quiet
        assert len(shown()) == 3 and shown()[-1].startswith("progress: written 2/8 ")
        progress.tick("finished")  # the last line always
        assert len(shown()) == 4
    assert json.loads((tmp_path / "out" / "_progress.json").read_text())["written"] == 2  # every tick, shown or not


def test_filter_embedding_pass_is_counted_then_the_written_samples(tmp_path, caplog):
    """filter's first pass commits embedding files, no index rows: the display counts their rows against the
    samples to embed, ``_progress.json`` and ``stylegen status`` say so, then the index rows are counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.review.status import output_status

    store = OutputStore(str(tmp_path / "out"))
    store.prepare()
    emb = tmp_path / "out" / "embeddings"
    emb.mkdir()
    pq.write_table(pa.table({"key": ["old"]}), emb / "before.parquet")  # reused embeddings: not this pass
    emb_store = OutputStore(str(emb))
    clock = Clock()
    progress = ProgressReporter(store, planned=6, interval_s=2, clock=clock, display="lines", command="filter")
    progress.embedding(emb_store, 5)
    with caplog.at_level("INFO", logger="pipeline.output.progress"):
        progress.start()
        clock.t += 10
        pq.write_table(pa.table({"key": ["a", "b", "c", "d"]}), emb / "part-0.parquet")
        progress.tick()
        assert progress.line().startswith("progress: embedded 4/5 (80.0%) | 0.40 samples/s | ETA 2s")
        found = output_status(str(tmp_path / "out"))
        assert found.state == "running" and ": filter running (updated " in found.line(), found.line()
        assert "this run embedded 4/5 (80.0%) | 0.40 samples/s" in found.line(), found.line()
        pq.write_table(pa.table({"key": ["e"]}), emb / "part-1.parquet")
        progress.writing()
        assert progress.embedded == 5 and progress.stage == "write"
        clock.t += 4
        _commit(store, "a", ["kept", "rejected"])
        progress.tick()
        assert progress.line().startswith("progress: written 2/6 (33.3%) kept=1 rejected=1 failed=0 | 0.50 samples/s")
        assert "this run written 2/6" in output_status(str(tmp_path / "out")).line()
        progress.stop("finished")
    shown = [r.getMessage().split(" | ")[0] for r in caplog.records if r.name == "pipeline.output.progress"]
    assert shown == ["progress: embedded 4/5 (80.0%)", "progress: written 2/6 (33.3%) kept=1 rejected=1 failed=0",
                     "progress: written 2/6 (33.3%) kept=1 rejected=1 failed=0"], shown
    record = json.loads((tmp_path / "out" / "_progress.json").read_text())
    assert (record["state"], record["stage"], record["embedded"], record["to_embed"]) == ("finished", "write", 5, 5)


def test_two_threads_polling_at_once_count_a_file_once(tmp_path, monkeypatch):
    """filter's writing() polls on the caller's thread while the ticker thread may be polling: a file read by
    both at the same moment must still count once."""
    import threading
    import time

    import pipeline.output.progress as progress_module

    store = OutputStore(str(tmp_path / "out"))
    store.prepare()
    progress = ProgressReporter(store, planned=4, interval_s=0, clock=Clock())
    _commit(store, "a", ["kept", "kept", "failed"])
    real = progress_module.index_statuses

    def slow(store, path):  # both threads are inside the read before either marks the file seen
        time.sleep(0.3)
        return real(store, path)

    monkeypatch.setattr(progress_module, "index_statuses", slow)
    threads = [threading.Thread(target=progress.poll) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert progress.counts == {"kept": 2, "rejected": 0, "failed": 1}
