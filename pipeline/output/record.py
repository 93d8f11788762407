"""What a finished ``run`` or ``filter`` records: its summary (the counts the CLI prints), the package versions,
the totals of the dataset counted from the index files, and ``run.json``. One record for both commands, so that a
reader (the card, ``report``, ``reproduce``) finds the same fields in either."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import pyarrow.compute as pc

from pipeline.output.resume import status_totals
from pipeline.output.store import OutputStore
from pipeline.redact import public_config

VERSIONED = ("stylegen", "torch", "ray", "diffusers", "transformers", "open-clip-torch", "webdataset",
             "pyarrow", "fsspec", "s3fs", "pillow")


@dataclass
class RunSummary:
    planned: int
    kept: int = 0
    rejected: int = 0
    failed: int = 0
    skipped: int = 0
    orphans_removed: int = 0
    repaired: int = 0  # damaged files found at start-up and quarantined (their samples redone)
    retried: int = 0  # failed rows superseded by --retry-failed
    timings: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        return (f"planned={self.planned} kept={self.kept} rejected={self.rejected} "
                f"failed={self.failed} skipped={self.skipped}")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def tally(config: Any, store: OutputStore, summary: RunSummary, before: set[str], todo: int,
          plan) -> dict[str, Any]:
    """Count this run's outcomes into ``summary`` from the index files it committed, and return the dataset
    totals over the planned keys (a join on the cluster). A sample of this run without an index row is an error
    (the invariant of docs/architecture.md §5). The driver reads status columns file by file, never a set of keys."""
    new = [p for p in store.index_files() if p not in before]
    for path in new:
        counts = pc.value_counts(store.read_parquet(path, ["status"]).column("status"))
        for status, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True):
            setattr(summary, status, getattr(summary, status) + n)
    written = summary.kept + summary.rejected + summary.failed
    if written != todo:
        raise RuntimeError(f"{todo - written} planned samples have no index row after the run")
    totals = status_totals(plan, store, store.index_files(), config.output.samples_per_shard)
    return {"planned": summary.planned, **totals, "complete": sum(totals.values()) == summary.planned}


RANDOM_CLIP = "CLIP weights are random (clip_pretrained: none or a tiny model): scores are meaningless"


def scores_note(config: Any) -> str | None:
    """Why the scores of ``config`` mean nothing (random CLIP weights), or None: recorded in ``run.json`` and said
    once on the console, in stylegen's words, instead of open_clip's line per actor."""
    from operators.clip_score import resolve_clip

    _, _, meaningful = resolve_clip(config.scoring.clip_model, config.scoring.clip_pretrained)
    return None if meaningful else RANDOM_CLIP


def run_record(config: Any, summary: RunSummary, dataset: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The ``run.json`` of a ``run`` or a ``filter`` (``extra``: what only that command records, e.g. its hash):
    the public config, package versions, this run's counts, the dataset totals, whether the scores mean anything,
    and when it finished."""
    note = scores_note(config)
    return {
        "config": public_config(config),
        **extra,
        "versions": package_versions(),
        "this_run": asdict(summary),
        "dataset": dataset,
        "scores_meaningful": note is None,
        "scores_note": note,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
