"""A run that stops progressing ends with one line naming what the cluster lacks (``ray.stall_timeout_s``), and a
GPU actor pool holds a quarter of a CPU unless its config says otherwise, so decode and write tasks fit beside."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.config import RayConfig
from pipeline.stall import Pool, Sample, guard, stall_reason
from tests.invariants import check_invariants

REPO = Path(__file__).resolve().parents[1]
POOLS = [Pool("operator", 1, 0.5, (1, 2)), Pool("scoring", 1, 0, (1, 1))]


def _sample(cpu_free: float, cpu: float = 4, gpu: float = 2, alive=("a", "b")) -> Sample:
    return Sample(0.0, {"CPU": cpu_free, "GPU": 0.0}, {"CPU": cpu, "GPU": gpu}, frozenset(alive))


def test_stall_reason_names_a_lost_node_and_the_cpus_the_pools_hold():
    start = _sample(4)
    assert stall_reason(start, _sample(0.5, cpu=2, gpu=1, alive=("a",)), POOLS) == (
        "a node was lost (1 of 2 gone); no CPU left for decode/write tasks: the actor pools hold 1.5 of 2 CPUs "
        "(operator 1-2 x num_cpus 1, num_gpus 0.5, scoring 1-1 x num_cpus 1)")
    assert stall_reason(start, _sample(0), POOLS).startswith("no CPU left for decode/write tasks: the actor pools "
                                                             "hold 4 of 4 CPUs")
    assert stall_reason(start, _sample(2, gpu=0), POOLS) == "the operator pool asks 0.5 GPU per actor and the " \
                                                            "cluster has 0"
    assert stall_reason(start, _sample(2), POOLS).startswith("Ray shows 2 of 4 CPUs and 0 of 2 GPUs free")


def test_stall_timeout_is_the_datasets_no_progress_guard_and_0_turns_it_off(ray_local):
    ds = ray_local.data.range(3)
    guard(ds, 42)
    assert ds.context.execution_no_progress_timeout_s == 42
    guard(ds, 0)
    assert ds.context.execution_no_progress_timeout_s == -1
    assert RayConfig().stall_timeout_s == 600


# The CLI on an already started Ray of 2 CPUs and 1 GPU (init_ray leaves a running Ray as it is).
CLI = textwrap.dedent("""
    import sys, ray
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    from jobs.cli import main
    sys.argv = ["stylegen", *sys.argv[1:]]
    main()
""")


def _cli(*sets: str, command: tuple[str, ...] = ("run", "configs/demo.yaml")) -> subprocess.CompletedProcess:
    args = [*command, "--quiet", *(a for s in sets for a in ("--set", s))]
    return subprocess.run([sys.executable, "-c", CLI, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.slow
def test_pools_holding_every_cpu_stop_with_one_line_and_the_gpu_default_finishes_the_rerun(tmp_path):
    from pipeline.config import load_config
    from pipeline.plan.keys import build_plan

    sets = [f"output.path={tmp_path / 'out'}", "operator.num_gpus=0.5", "scoring.num_gpus=0.5",
            "scoring.clip_model=tiny:clip", "ray.stall_timeout_s=10"]
    # A whole CPU per GPU actor: the two pools hold both CPUs, no decode task can start. Without the stall
    # guard this run never returns (the subprocess timeout fails the test).
    stalled = _cli(*sets, "operator.num_cpus=1", "scoring.num_cpus=1")
    errors = [ln for ln in stalled.stderr.splitlines() if ln.startswith("error: ")]
    assert stalled.returncode == 1, stalled.stdout[-2000:] + stalled.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in stalled.stderr, stalled.stderr[-3000:]
    assert errors[0] == (
        "error: run stalled: nothing progressed for 10s (ray.stall_timeout_s): no CPU left for decode/write "
        "tasks: the actor pools hold 2 of 2 CPUs (operator 1-1 x num_cpus 1, num_gpus 0.5, scoring 1-1 x "
        "num_cpus 1, num_gpus 0.5); what is committed is kept: rerun the same command to resume"), errors[0]
    # The same run with num_cpus left to its GPU default (0.25 a GPU actor) fits and finishes.
    rerun = _cli(*sets)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert rerun.stdout.strip().splitlines()[-1] == "planned=12 kept=12 rejected=0 failed=0 skipped=0"
    check_invariants(str(tmp_path / "out"), {p.key for p in build_plan(load_config(REPO / "configs/demo.yaml",
                                                                                   sets))})


@pytest.mark.slow
def test_a_filter_whose_scorers_hold_every_cpu_stops_with_the_one_line(tmp_path, samples):
    import yaml

    from tests.unit_helpers import wds_tar

    images = sorted((samples / "content").iterdir())[:3]
    wds_tar(tmp_path / "part-0.tar", {f"s{i}": {"jpg": p.read_bytes(), "txt": b"a picture"}
                                      for i, p in enumerate(images)})
    config = tmp_path / "filter.yaml"
    config.write_text(yaml.safe_dump({"input": {"shards": str(tmp_path / "part-*.tar")},
                                      "output": {"path": str(tmp_path / "out")},
                                      "scoring": {"clip_model": "tiny:clip", "num_cpus": 2.0},
                                      "ray": {"stall_timeout_s": 10}}))
    stalled = _cli(command=("filter", str(config)))
    errors = [ln for ln in stalled.stderr.splitlines() if ln.startswith("error: ")]
    assert stalled.returncode == 1 and len(errors) == 1, stalled.stdout[-2000:] + stalled.stderr[-3000:]
    assert errors[0].startswith("error: run stalled: nothing progressed for 10s (ray.stall_timeout_s): no CPU "
                                "left for decode/write tasks: the actor pools hold 2 of 2 CPUs (scoring 1-1 x "
                                "num_cpus 2)"), errors[0]
