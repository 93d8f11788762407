"""``stylegen status OUTPUT``: how far a run on an output is (a local run in another terminal, a job on a
cluster, an S3 output), read from the output's own files without taking its writer lease.

The running command rewrites ``_progress.json`` every few seconds (:mod:`pipeline.output.progress`): its counts,
rate and ETA, and when it last did. The dataset totals are counted from the committed index files (the status
column of each), so a stopped or finished output reports what it holds whoever wrote it. Read-only, like
``report``: what the files say is data, never a path to follow."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.output.progress import PROGRESS_FILE, duration, embedding_text, index_statuses, progress_text
from pipeline.output.store import OutputStore

# A running command rewrites _progress.json at least every few seconds; older than this, it no longer runs.
STALE_S = 60.0


@dataclass
class OutputStatus:
    url: str
    state: str  # "running", "stopped", "finished" or "empty"
    totals: dict[str, int] = field(default_factory=dict)  # index rows by status, the whole output
    progress: dict[str, Any] | None = None  # _progress.json of the last command
    finished_at: str | None = None
    planned: int | None = None  # the dataset's planned count, when a command recorded it

    def line(self) -> str:
        t = self.totals
        held = sum(t.values())
        totals = (f"kept={t.get('kept', 0)} rejected={t.get('rejected', 0)} failed={t.get('failed', 0)}")
        of = f"/{self.planned}" if self.planned is not None else ""
        if self.state == "running" and self.progress:
            p = self.progress
            age = duration(max(0.0, time.time() - float(p.get("updated_at", 0))))
            if p.get("stage") == "embed":  # filter's first pass: no index rows yet
                this_run = embedding_text(p["embedded"], p["to_embed"], p.get("rate"), p.get("eta_s"))
            else:
                this_run = progress_text(int(p.get("written", 0)), int(p.get("planned", 0)), p, p.get("rate"),
                                         p.get("eta_s"))
            return (f"{self.url}: {p.get('command', 'run')} running (updated {age} ago): this run {this_run}; "
                    f"the output holds {held}{of} ({totals})")
        if self.state == "finished":
            return f"{self.url}: finished at {self.finished_at}: holds {held}{of} ({totals})"
        if self.state == "stopped":
            when = ""
            if self.progress and self.progress.get("updated_at"):
                when = f" {duration(max(0.0, time.time() - float(self.progress['updated_at'])))} ago"
            return (f"{self.url}: stopped{when}: holds {held}{of} ({totals}); rerun the same command to resume")
        return f"{self.url}: no run recorded yet"


def _totals(store: OutputStore) -> dict[str, int]:
    totals = {"kept": 0, "rejected": 0, "failed": 0}
    for path in store.index_files():
        try:
            statuses = index_statuses(store, path)
        except Exception:  # a file being replaced right now: the next status call counts it
            continue
        for status in statuses:
            totals[status] = totals.get(status, 0) + 1
    return totals


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _clean(progress: Any) -> dict[str, Any] | None:
    """Only the fields status shows, as numbers or short words: the file is data from the output."""
    if not isinstance(progress, dict):
        return None
    out: dict[str, Any] = {k: _number(progress.get(k)) for k in
                           ("planned", "dataset_planned", "written", "kept", "rejected", "failed", "embedded",
                            "to_embed", "rate", "eta_s", "started_at", "updated_at")}
    for k in ("planned", "dataset_planned", "written", "kept", "rejected", "failed", "embedded", "to_embed"):
        out[k] = int(out[k]) if out[k] is not None else 0
    out["command"] = progress.get("command") if progress.get("command") in ("run", "filter") else "run"
    out["state"] = progress.get("state") if progress.get("state") in ("running", "stopped", "finished") else None
    out["stage"] = "embed" if progress.get("stage") == "embed" else "write"
    return out


def output_status(url: str) -> OutputStatus:
    """The state of the output at ``url`` and its counts."""
    store = OutputStore(url, fsync=False)
    progress = _clean(store.read_json(PROGRESS_FILE))
    record = store.read_json("run.json")
    record = record if isinstance(record, dict) else {}
    totals = _totals(store)
    dataset = record.get("dataset") if isinstance(record.get("dataset"), dict) else {}
    planned = _number(dataset.get("planned"))
    finished_at = record.get("finished_at") if isinstance(record.get("finished_at"), str) else None
    if progress and progress["dataset_planned"]:
        planned = progress["dataset_planned"]
    fresh = progress and progress["updated_at"] and time.time() - progress["updated_at"] < STALE_S
    if progress and progress["state"] == "running" and fresh:
        state = "running"
    elif progress and progress["state"] != "finished" and (progress["state"] is not None):
        state = "stopped"
    elif finished_at:
        state = "finished"
    elif sum(totals.values()):
        state = "stopped"
    else:
        state = "empty"
    return OutputStatus(url, state, totals, progress, finished_at[:40] if finished_at else None,
                        int(planned) if planned is not None else None)
