"""Progress lines during a run: counts from committed index files, rate, ETA; off with quiet."""

from __future__ import annotations

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
