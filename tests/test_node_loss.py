"""A worker node lost mid-run on a real two-node cluster: the run finishes on the node left, every planned key
exactly once, because its GPU actor pools hold a quarter of a CPU each and decode and write tasks still fit."""

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


def _planned(sets: list[str]) -> set[str]:
    from pipeline.config import load_config
    from pipeline.plan.keys import build_plan

    return {p.key for p in build_plan(load_config(REPO / "configs/demo.yaml", sets))}


def test_worker_node_lost_mid_run_the_run_finishes_on_the_node_left(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the nodes' workers import tests.plugin_ops
    out = tmp_path / "out"
    # Two CPUs a node: with a whole CPU per GPU actor the two pools would hold both CPUs of the node left.
    sets = [f"output.path={out}", "output.samples_per_shard=2", "pairing.styles_per_content=3",
            "operator.name=tests.plugin_ops:Hold", "operator.params={seconds: 1.0, size: 32}",
            "operator.batch_size=1", "operator.num_gpus=0.5", "operator.actors=[1,2]",
            "scoring.clip_model=tiny:clip", "scoring.num_gpus=0.5", "scoring.batch_size=2",
            "ray.stall_timeout_s=60"]
    with local_cluster(nodes=2, gpus_per_node=1, cpus_per_node=2) as cluster:
        args = [sys.executable, "-m", "jobs.cli", "run", "configs/demo.yaml", "--quiet",
                "--address", cluster["address"]]
        for s in sets:
            args += ["--set", s]
        driver = subprocess.Popen(args, cwd=REPO, env=cluster["env"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 240
            while not (out.exists() and OutputStore(str(out), fsync=False).index_files()):
                assert driver.poll() is None and time.time() < deadline, driver.communicate(timeout=30)
                time.sleep(0.2)
            kill_node(cluster, 1)  # the worker node, after the first commit
            stdout, stderr = driver.communicate(timeout=300)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait(timeout=30)
        assert driver.returncode == 0, stdout[-3000:] + stderr[-3000:]
        assert "planned=18 kept=18 rejected=0 failed=0" in stdout, stdout
    check_invariants(str(out), _planned(sets))
