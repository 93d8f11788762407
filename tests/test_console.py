"""The console of a run on a terminal (one progress display redrawn in place), ``--json`` for scripts, and
``stylegen status OUTPUT`` answering "how far" for a run in another terminal, while it runs and once it stopped.
The piped console and ``--quiet`` are checked on the demo in tests/test_cli.py."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from pipeline.output.store import OutputStore
from tests.invariants import read_index

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STYLEGEN = [sys.executable, "-m", "jobs.cli"]


def _under_a_terminal(args: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run ``stylegen ARGS`` with stdout and stderr on a pseudo-terminal of 100 columns; its exit code and output."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([*STYLEGEN, *args], cwd=REPO, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    try:
        while time.time() < deadline:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        os.close(master)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace")


def test_a_run_on_a_terminal_shows_one_bar_redrawn_in_place_and_json_parses(tmp_path):
    out = tmp_path / "out"
    code, text = _under_a_terminal(["run", "configs/demo.yaml", "--set", f"output.path={out}",
                                    "--set", "scoring.clip_model=tiny:clip", "--json"])
    assert code == 0, text[-3000:]
    lines = text.replace("\r\n", "\n").split("\n")
    bar = [ln for ln in lines if "sample" in ln and "|" in ln]
    assert len(bar) == 1, text  # one line of the terminal ...
    redraws = bar[0].split("\r")
    assert len(redraws) >= 3, bar  # ... drawn again and again in place
    assert "12/12" in redraws[-1] and "kept=" in redraws[-1], redraws[-1]
    assert not [ln for ln in lines if ln.startswith("progress: ")], "no plain progress lines on a terminal"
    # (colorama, imported by a dependency, resets the terminal's colours at exit: "\x1b[0m" on stdout, invisible)
    summary = json.loads([ln for ln in (re.sub(r"\x1b\[[0-9;]*m", "", ln) for ln in lines) if ln.strip()][-1])
    assert (summary["planned"], summary["kept"] + summary["rejected"] + summary["failed"]) == (12, 12), summary


def _status(out: Path, *more: str) -> subprocess.CompletedProcess:
    return subprocess.run([*STYLEGEN, "status", str(out), *more], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_status_of_an_output_while_it_runs_and_after_it_stopped(tmp_path):
    out = tmp_path / "out"
    sets = [f"output.path={out}", "output.samples_per_shard=2", "operator.name=tests.plugin_ops:Hold",
            "operator.params={seconds: 2.0, size: 32}", "operator.batch_size=2", "scoring.clip_model=tiny:clip"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the actors import tests.plugin_ops
    run = subprocess.Popen([*STYLEGEN, "run", "configs/demo.yaml", "--quiet", *(a for s in sets for a in ("--set", s))],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out.exists() and OutputStore(str(out), fsync=False).index_files()):
            assert run.poll() is None and time.time() < deadline, run.communicate(timeout=30)
            time.sleep(0.2)
        running = _status(out)
        assert running.returncode == 0 and running.stderr == "", running.stderr
        assert running.stdout.startswith(f"{out}: run running (updated "), running.stdout
        assert " samples/s | ETA " in running.stdout and "/12 (kept=" in running.stdout, running.stdout
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=120) == 128 + signal.SIGTERM, run.communicate()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=30)
    rows = read_index(str(out))
    assert 0 < len(rows) < 12, "stopped half-way"
    stopped = _status(out)
    kept = sum(r["status"] == "kept" for r in rows)
    assert stopped.stdout.startswith(f"{out}: stopped "), stopped.stdout
    assert f"holds {len(rows)}/12 (kept={kept} " in stopped.stdout, stopped.stdout
    assert stopped.stdout.strip().endswith("rerun the same command to resume"), stopped.stdout
    found = json.loads(_status(out, "--json").stdout)
    assert (found["state"], sum(found["totals"].values()), found["planned"]) == ("stopped", len(rows), 12), found
    assert _status(tmp_path / "nowhere").returncode == 2
