"""One writer per output: the lease refuses a second writer with a line naming the holder, survives while its
holder lives (heartbeat on S3), and frees itself when the holder crashes (kernel lock locally, TTL on S3)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.output.lease import Lease, LeaseHeld

REPO = Path(__file__).resolve().parents[1]
HOLDER = re.compile(r"^(.+): being written by \S+ pid (\d+) since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

HOLD_SCRIPT = """
import signal, sys, time
from pipeline.output.lease import Lease
if len(sys.argv) > 3:  # how SIGINT is set up: Python's default, or ignored as in a background job
    signal.signal(signal.SIGINT, signal.SIG_IGN if sys.argv[3] == "ignored" else signal.default_int_handler)
lease = Lease(sys.argv[1], ttl_s=float(sys.argv[2])).acquire()
print("held", flush=True)
for _ in range(6000):  # short sleeps: a lost lease's interrupt is taken between them
    time.sleep(0.1)
"""


def _hold_in_child(url: str, ttl_s: float, env: dict | None = None, stderr=None, sigint: str | None = None):
    extra = [sigint] if sigint else []
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, url, str(ttl_s), *extra], cwd=REPO,
                            stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


def _crash(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_local_lease_refuses_a_second_writer_and_frees_on_crash(tmp_path):
    out = str(tmp_path / "out")
    holder = _hold_in_child(out, 120)
    try:
        with pytest.raises(LeaseHeld) as err:
            Lease(out).acquire()
        match = HOLDER.match(str(err.value))
        assert match and match.group(1) == out and int(match.group(2)) == holder.pid, str(err.value)
    finally:
        _crash(holder)
    with Lease(out) as lease:  # the kernel dropped the crashed holder's lock
        assert lease.info["pid"] == os.getpid()
        with pytest.raises(LeaseHeld):
            Lease(out).acquire()  # a second open file in the same process is refused too
    Lease(out).acquire().release()


@pytest.mark.s3
def test_s3_lease_heartbeat_keeps_it_and_a_crashed_holder_expires(s3_env):
    url = f"s3://{s3_env['bucket']}/out"
    holder = _hold_in_child(url, 2, env=s3_env["env"])
    try:
        time.sleep(3)  # longer than the TTL: only the heartbeat keeps the lease
        with pytest.raises(LeaseHeld) as err:
            Lease(url, ttl_s=2).acquire()
        assert HOLDER.match(str(err.value)) and f"pid {holder.pid} " in str(err.value)
    finally:
        _crash(holder)
    with pytest.raises(LeaseHeld):  # crashed, but not yet expired
        Lease(url, ttl_s=2).acquire()
    time.sleep(2.5)
    lease = Lease(url, ttl_s=2).acquire()  # expired: taken over
    lease.release()
    Lease(url, ttl_s=2).acquire().release()  # released: free at once


@pytest.mark.s3
@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_s3_lease_lost_to_another_writer_stops_the_holder(s3_env, sigint):
    """When another writer overwrites the lease, the heartbeat's If-Match fails and the holder stops: by a
    KeyboardInterrupt in its main thread, or, where SIGINT is ignored (a background job), by SIGTERM."""
    url = f"s3://{s3_env['bucket']}/lost-{sigint}"
    holder = _hold_in_child(url, 2, env=s3_env["env"], stderr=subprocess.PIPE, sigint=sigint)
    try:
        s3_env["fs"].pipe_file(f"{s3_env['bucket']}/lost-{sigint}/_lease", b'{"host": "other", "pid": 1}')
        _, stderr = holder.communicate(timeout=60)
    finally:
        if holder.poll() is None:
            _crash(holder)
    assert "lost the writer lease" in stderr, stderr[-2000:]
    if sigint == "default":
        assert holder.returncode != 0 and "KeyboardInterrupt" in stderr, stderr[-2000:]
    else:
        assert holder.returncode == -signal.SIGTERM, (holder.returncode, stderr[-2000:])


def test_check_refuses_while_held_and_creates_nothing(tmp_path, s3_env):
    fresh = tmp_path / "new-output"
    Lease(str(fresh)).check()
    assert not fresh.exists()  # a check never creates the output
    out = tmp_path / "out"
    with Lease(str(out)):
        with pytest.raises(LeaseHeld, match=rf"^{out}: being written by .* pid {os.getpid()} since "):
            Lease(str(out)).check()
    Lease(str(out)).check()  # released: no error
    url = f"s3://{s3_env['bucket']}/out"
    Lease(url).check()
    with Lease(url, ttl_s=30):
        with pytest.raises(LeaseHeld, match=rf"^{url}: being written by "):
            Lease(url, ttl_s=30).check()
    Lease(url).check()
