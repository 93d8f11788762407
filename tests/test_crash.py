"""Crash safety: kill -9 of the whole run (driver and its embedded Ray) at random moments, an actor
killed mid-batch, and failed uploads on S3. After a final rerun the invariants of docs/architecture.md §5 hold."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.plan.keys import build_plan
from tests.invariants import check_invariants

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _sets(out: Path, samples: Path) -> list[str]:
    return [f"output.path={out}", f"content.images={samples / 'content'}", "content.prompts=null",
            f"style.images={samples / 'style'}", "pairing.styles_per_content=3", "output.samples_per_shard=3",
            "operator.batch_size=1", "decode.max_side=96", "scoring.clip_model=tiny:clip", "scoring.batch_size=3"]


def start_run(sets: list[str], env: dict | None = None, stderr=subprocess.DEVNULL,
              quiet: bool = True) -> subprocess.Popen:
    """``stylegen run configs/demo.yaml --quiet`` with ``--set`` overrides, in its own process group."""
    args = [sys.executable, "-m", "jobs.cli", "run", "configs/demo.yaml", *(["--quiet"] if quiet else [])]
    for s in sets:
        args += ["--set", s]
    return subprocess.Popen(args, cwd=REPO, env={**os.environ, **(env or {})}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def group_alive(pgid: int) -> list[int]:
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    alive.append(int(entry))
            except ProcessLookupError:
                pass
    return alive


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 20
    while group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not group_alive(proc.pid), "processes of the killed run survived"


def _index_count(out: Path) -> int:
    return len(list((out / "index").glob("*.parquet"))) if (out / "index").is_dir() else 0


def test_kill_minus_9_at_random_moments_then_resume(samples, tmp_path):
    out = tmp_path / "out"
    sets = _sets(out, samples)
    planned = {p.key for p in build_plan(load_config(REPO / "configs/demo.yaml", sets))}
    assert len(planned) == 42
    rng = random.Random(20261122)
    kills = 0
    # Moment 1: during start-up; moments 2 and 3: while shards are being committed.
    for moment in range(3):
        proc = start_run(sets)
        if moment == 0:
            time.sleep(rng.uniform(0.5, 4.0))
        else:
            start_count = _index_count(out)
            deadline = time.time() + 120
            while _index_count(out) == start_count and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            kill_group(proc)
            kills += 1
        for index in (out / "index").glob("*.parquet"):  # whatever landed is whole
            pq.read_table(index)
    assert kills >= 2, "the run finished before it could be killed; the test proves nothing"
    done_before = len({r for f in (out / "index").glob("*.parquet") for r in pq.read_table(f)["key"].to_pylist()})

    final = start_run(sets)
    stdout, _ = final.communicate(timeout=300)
    assert final.returncode == 0, stdout
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("planned=42 ") and last.endswith(f"skipped={done_before}"), last
    rows = check_invariants(str(out), planned)
    assert all(r["status"] == "kept" for r in rows)


def test_actor_killed_mid_batch_loses_nothing(samples, tmp_path):
    out = tmp_path / "out"
    sets = _sets(out, samples)[:3] + ["pairing.styles_per_content=1", "operator.batch_size=2",
                                      "scoring.clip_model=tiny:clip", "decode.max_side=96"]
    marker = tmp_path / "actor-killed"
    proc = start_run(sets, env={"STYLEGEN_FAULT_KILL_ONCE": str(marker)})
    stdout, _ = proc.communicate(timeout=300)
    assert marker.exists(), "the fault was not injected"
    assert proc.returncode == 0
    assert stdout.strip().splitlines()[-1] == "planned=14 kept=14 rejected=0 failed=0 skipped=0"
    check_invariants(str(out), {p.key for p in build_plan(load_config(REPO / "configs/demo.yaml", sets))})
