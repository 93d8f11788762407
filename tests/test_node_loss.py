"""A worker node lost mid-run on a real two-node cluster (1 logical GPU a node, stylize pool [1, 2]): the run
finishes on the node left (Ray restarts the lost actors there), every planned key exactly once; when the lost
node held a stylize actor that cannot fit on the node left, it stops after ``ray.stall_timeout_s`` with one line
naming the lost node, and a rerun with the GPU pools' default num_cpus (0.25 an actor) finishes it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.output.store import OutputStore
from tests.cluster import kill_node, local_cluster
from tests.invariants import check_invariants

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PLANNED = 18


def _sets(out: Path, *more: str) -> list[str]:
    return [f"output.path={out}", "output.samples_per_shard=2", "pairing.styles_per_content=3",
            "operator.name=tests.plugin_ops:Hold", "operator.params={seconds: 1.0, size: 32}",
            "operator.batch_size=1", "operator.num_gpus=0.5", "operator.actors=[1,2]",
            "scoring.clip_model=tiny:clip", "scoring.num_gpus=0.5", "scoring.batch_size=2", *more]


def _planned(sets: list[str]) -> set[str]:
    from pipeline.config import load_config
    from pipeline.plan.keys import build_plan

    return {p.key for p in build_plan(load_config(REPO / "configs/demo.yaml", sets))}


def _args(cluster: dict, sets: list[str]) -> list[str]:
    args = [sys.executable, "-m", "jobs.cli", "run", "configs/demo.yaml", "--quiet", "--address", cluster["address"]]
    return args + [a for s in sets for a in ("--set", s)]


def _run_losing_the_worker(cluster: dict, out: Path, sets: list[str]) -> subprocess.CompletedProcess:
    """Run against the cluster and kill the worker node once the first shard is committed."""
    driver = subprocess.Popen(_args(cluster, sets), cwd=REPO, env=cluster["env"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out.exists() and (committed := OutputStore(str(out), fsync=False).index_files())):
            assert driver.poll() is None and time.time() < deadline, driver.communicate(timeout=30)
            time.sleep(0.2)
        kill_node(cluster, 1)
        assert len(committed) < PLANNED // 2 and driver.poll() is None, "the node must be lost mid-run"
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
    return subprocess.CompletedProcess(driver.args, driver.returncode, stdout, stderr)


@pytest.fixture
def cluster(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the nodes' workers import tests.plugin_ops
    with local_cluster(nodes=2, gpus_per_node=1, cpus_per_node=2) as cluster:
        yield cluster


@pytest.fixture
def big_worker(monkeypatch):
    """A head of 2 CPUs and a worker of 4: a stylize actor of 2.5 CPUs lands on the worker and nowhere else."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    with local_cluster(nodes=2, gpus_per_node=1, cpus_per_node=(2, 4)) as cluster:
        yield cluster


def test_worker_node_lost_mid_run_the_run_finishes_on_the_node_left(tmp_path, cluster):
    out = tmp_path / "out"
    sets = _sets(out, "ray.stall_timeout_s=60")
    proc = _run_losing_the_worker(cluster, out, sets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"planned={PLANNED} kept={PLANNED} rejected=0 failed=0" in proc.stdout, proc.stdout
    check_invariants(str(out), _planned(sets))


def test_a_lost_stylize_actor_that_fits_nowhere_left_stops_with_one_line_and_a_rerun_finishes(tmp_path, big_worker):
    cluster, out = big_worker, tmp_path / "out"
    # The stylize actor (2.5 CPUs) can only live on the worker, so losing the worker loses it, and the 2-CPU head
    # cannot take it back: nothing progresses. (The score actor, 1 CPU, may live on either node; the head keeps a
    # CPU free for tasks either way.) Were the stylize actor on the node left, it would finish its inputs, give
    # its CPUs back, and the score pool would come back: the run would rightly finish.
    sets = _sets(out, "operator.num_cpus=2.5", "scoring.num_cpus=1", "ray.stall_timeout_s=30")
    stalled = _run_losing_the_worker(cluster, out, sets)
    errors = [ln for ln in stalled.stderr.splitlines() if ln.startswith("error: ")]
    assert stalled.returncode == 1 and len(errors) == 1, stalled.stdout[-3000:] + stalled.stderr[-3000:]
    line = errors[0]
    assert line.startswith("error: run stalled: nothing progressed for 30s (ray.stall_timeout_s): "), line
    assert "a node was lost (1 of 2 gone)" in line, line
    assert line.endswith("what is committed is kept: rerun the same command to resume"), line
    kept = OutputStore(str(out), fsync=False).index_files()
    assert kept, "the shards committed before the loss stay"
    # The same run on the node left, its GPU pools at their default num_cpus: it resumes and finishes.
    rerun = subprocess.run(_args(cluster, _sets(out)), cwd=REPO, env=cluster["env"], capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    skipped = int(rerun.stdout.strip().splitlines()[-1].rpartition("skipped=")[2])
    assert skipped > 0, rerun.stdout
    check_invariants(str(out), _planned(sets))
