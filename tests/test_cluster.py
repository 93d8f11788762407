"""Cluster execution: Ray Jobs submission to a real two-node cluster, GPU-pinned actor pools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.cluster import local_cluster
from tests.invariants import check_invariants

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def token_only(cluster: dict, **changes: str) -> dict:
    """The client's environment as the README tells users to set it: the token exported, no RAY_AUTH_MODE (the
    cluster itself runs with RAY_AUTH_MODE=token). ``changes`` replace or (with None) remove variables."""
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_MODE"}
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def stylegen(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _planned(args_sets: list[str]) -> set[str]:
    from pipeline.config import load_config
    from pipeline.plan.keys import build_plan

    return {p.key for p in build_plan(load_config(REPO / "configs/demo.yaml", args_sets))}


def test_submit_wait_on_two_node_cluster_uses_both_gpus(tmp_path):
    out = tmp_path / "out"
    sets = [f"output.path={out}", "operator.num_gpus=1", "operator.actors=[2,2]", "operator.batch_size=1",
            "scoring.clip_model=tiny:clip", "pairing.styles_per_content=3"]
    with local_cluster(nodes=2, gpus_per_node=1) as cluster:
        env = token_only(cluster)
        args = [sys.executable, "-m", "jobs.cli", "submit", "configs/demo.yaml", "--address", cluster["dashboard"]]
        for s in sets:
            args += ["--set", s]
        proc = subprocess.run([*args, "--wait"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "SUCCEEDED" in proc.stdout
        assert "planned=18 kept=18 rejected=0 failed=0 skipped=0" in proc.stdout
        job_id = proc.stdout.split("submitted: ", 1)[1].split()[0]

        # Same run again: the same submission id, no second job.
        again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and f"already submitted: {job_id}" in again.stdout, again.stdout + again.stderr
        status = stylegen("status", job_id, "--address", cluster["dashboard"], env=env)
        assert f"{job_id}: SUCCEEDED" in status.stdout, status.stdout + status.stderr
        assert f"{out}: finished at " in status.stdout and "holds 18/18 (kept=18 " in status.stdout, status.stdout
        job_logs = stylegen("logs", job_id, "--address", cluster["dashboard"], env=env)
        assert "planned=18" in job_logs.stdout
        stopped = stylegen("stop", job_id, "--address", cluster["dashboard"], env=env)
        assert stopped.returncode == 0 and f"{job_id}: not running" in stopped.stdout, stopped.stderr

    rows = check_invariants(str(out), _planned(sets))
    workers = {(w["node"], w["gpu"]) for w in (json.loads(r["meta"])["worker"] for r in rows)}
    assert len({node for node, _ in workers}) == 2, workers
    assert all(gpu is not None for _, gpu in workers), workers


def test_two_gpus_two_stylize_actors_on_distinct_gpu_ids(tmp_path):
    out = tmp_path / "out"
    # Each stylize call holds its device for 2 s (12 samples: 24 s for one actor alone), so both actors get work
    # even when one starts much later than the other on a loaded machine (a fast operator let the first actor
    # ready take all 12 samples, and the test saw one GPU id).
    sets = [f"output.path={out}", "operator.num_gpus=1", "operator.actors=[2,2]", "operator.batch_size=1",
            "scoring.clip_model=tiny:clip", "operator.name=tests.plugin_ops:Hold",
            "operator.params={seconds: 2.0, size: 32}"]
    script = textwrap.dedent(f"""
        import ray
        from pipeline.config import load_config
        from pipeline.generate.run import run
        ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
        cfg = load_config("configs/demo.yaml", {sets!r})
        print(run(cfg, quiet=True).line())
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # the actors import tests.plugin_ops
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = check_invariants(str(out), _planned(sets))
    by_pid: dict[int, str] = {}
    for r in rows:
        w = json.loads(r["meta"])["worker"]
        by_pid[w["pid"]] = w["gpu"]
    assert sorted(by_pid.values()) == ["0", "1"], by_pid  # two actors, one GPU each, distinct ids


@pytest.fixture(scope="module")
def cpu_cluster():
    """One two-node CPU cluster for the tests that need no GPU (a cluster start costs ~20 s)."""
    with local_cluster(nodes=2, gpus_per_node=0) as cluster:
        yield cluster


def test_submit_rejects_relative_output_and_failing_job_exits_nonzero(tmp_path, cpu_cluster):
    cluster = cpu_cluster
    base = [sys.executable, "-m", "jobs.cli", "submit", "configs/demo.yaml", "--address", cluster["dashboard"]]
    rel = subprocess.run(base, cwd=REPO, env=token_only(cluster), capture_output=True, text=True, timeout=60)
    assert rel.returncode == 2 and "output.path" in rel.stderr, rel.stderr
    # A job that cannot run (asks for a GPU the cluster does not have would hang; a bad model fails fast).
    bad = subprocess.run([*base, "--wait", "--set", f"output.path={tmp_path / 'o'}", "--set",
                          "scoring.clip_model=no-such-clip-model"],
                         cwd=REPO, env=token_only(cluster), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "FAILED" in bad.stdout


def test_submit_wait_filter_config_and_missing_dependency_probe(tmp_path, samples, cpu_cluster):
    """A filter config (with quality heads) submitted to the two-node cluster; then the same job on a cluster
    whose ``python`` is a bare interpreter fails on its first line with the one-line explanation."""
    import yaml
    from PIL import Image

    from tests.unit_helpers import png_bytes, wds_tar

    images = sorted((samples / "content").iterdir())[:6]
    for t in range(2):
        wds_tar(tmp_path / f"part-{t}.tar", {f"s{i}": {"jpg": p.read_bytes(), "txt": f"picture {i}".encode()}
                                             for i, p in enumerate(images) if i % 2 == t})
    wds_tar(tmp_path / "part-2.tar", {"tiny": {"png": png_bytes(Image.new("RGB", (8, 8))), "txt": b"tiny"}})
    config = tmp_path / "filter.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"shards": str(tmp_path / "part-*.tar")}, "output": {"path": str(tmp_path / "out")},
        "scoring": {"clip_model": "tiny:clip", "heads": {"aesthetic": {"weights": "tiny"}}},
        "filter": {"min_side": 16}}))
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    cluster = cpu_cluster
    args = [sys.executable, "-m", "jobs.cli", "submit", str(config), "--address", cluster["dashboard"], "--wait"]
    proc = subprocess.run(args, cwd=REPO, env=token_only(cluster), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout and "planned=7 kept=6 rejected=1 failed=0 skipped=0" in proc.stdout

    no_deps = subprocess.run([*args, "--set", f"output.path={tmp_path / 'out2'}", "--set",
                              f"ray.runtime_env={{env_vars: {{PATH: '{bare / 'bin'}:/usr/bin:/bin'}}}}"],
                             cwd=REPO, env=token_only(cluster), capture_output=True, text=True, timeout=300)
    assert no_deps.returncode == 1 and "FAILED" in no_deps.stdout, no_deps.stdout[-3000:] + no_deps.stderr
    assert "Traceback" not in no_deps.stdout, no_deps.stdout[-3000:]
    lines = [ln for ln in no_deps.stdout.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and f"{bare}/bin/python" in lines[0] and "cannot import torch" in lines[0], lines
    assert "--ship-deps" in lines[0]
    from pipeline.config import load_config
    from pipeline.filter.inputs import index_tars, list_inputs

    planned = {r["key"] for r in index_tars(list_inputs(load_config(config, schema="auto")))}
    rows = check_invariants(str(tmp_path / "out"), planned)
    assert len(rows) == 7 and all(r["score_aesthetic"] is not None for r in rows)
    assert not (tmp_path / "out2").exists()


def test_jobs_commands_with_only_the_token_file_and_one_line_auth_errors(tmp_path, cpu_cluster):
    """The token in a file (RAY_AUTH_TOKEN_PATH, nothing exported) works for submit, status, logs and stop; a wrong
    token or no token at all is one line ``error: ...`` (exit 2), the traceback only with --debug."""
    cluster, address = cpu_cluster, cpu_cluster["dashboard"]
    token_file = tmp_path / "token"
    token_file.write_text(cluster["env"]["RAY_AUTH_TOKEN"])
    home = tmp_path / "home"  # no ~/.ray/auth_token of this machine's own Ray sessions
    home.mkdir()
    by_file = token_only(cluster, RAY_AUTH_TOKEN=None, RAY_AUTH_TOKEN_PATH=str(token_file), HOME=str(home))
    # A job that waits for a GPU this cluster lacks: it stays pending until stopped, and costs nothing.
    proc = stylegen("submit", "configs/demo.yaml", "--address", address, "--set", f"output.path={tmp_path / 'o'}",
                    "--set", "operator.num_gpus=1", env=by_file)
    assert proc.returncode == 0 and "submitted: " in proc.stdout, proc.stdout + proc.stderr
    job_id = proc.stdout.split("submitted: ", 1)[1].split()[0]
    status = stylegen("status", job_id, "--address", address, env=by_file)
    assert status.returncode == 0 and status.stdout.startswith(f"{job_id}: "), status.stdout + status.stderr
    assert stylegen("logs", job_id, "--address", address, env=by_file).returncode == 0
    stopped = stylegen("stop", job_id, "--address", address, env=by_file)
    assert stopped.returncode == 0 and job_id in stopped.stdout, stopped.stdout + stopped.stderr

    wrong = token_only(cluster, RAY_AUTH_TOKEN="0" * 64, HOME=str(home))
    missing = token_only(cluster, RAY_AUTH_TOKEN=None, RAY_AUTH_TOKEN_PATH=str(tmp_path / "nope"), HOME=str(home))
    none = token_only(cluster, RAY_AUTH_TOKEN=None, HOME=str(home))
    cases = [(wrong, "Invalid authentication token"), (missing, "RAY_AUTH_TOKEN_PATH="),
             (none, "Missing authentication token")]
    for env, needle in cases:
        for args in (["status", job_id], ["logs", job_id], ["stop", job_id],
                     ["submit", "configs/demo.yaml", "--set", f"output.path={tmp_path / 'o2'}"]):
            proc = stylegen(*args, "--address", address, env=env)
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            assert proc.returncode == 2 and len(lines) == 1, (args, proc.returncode, proc.stderr[-3000:])
            assert lines[0].startswith(f"error: Ray at {address}: ") and needle in lines[0], lines[0]
    debug = stylegen("status", job_id, "--address", address, "--debug", env=wrong)
    assert debug.returncode != 0 and "AuthenticationError" in debug.stderr and "Traceback" in debug.stderr


def test_submit_plugin_operator_shipped_with_py_modules(tmp_path, samples, cpu_cluster):
    """The README's plug-in example submitted to the two-node cluster: its package travels with
    ``ray.runtime_env.py_modules`` (it is not in this project), and the output holds every planned key once."""
    import yaml

    from pipeline.config import validate_config
    from pipeline.plan.keys import build_plan
    from tests.plugin_ops import readme_plugin

    data = readme_plugin(tmp_path / "user", str(tmp_path / "out"), samples)
    config = tmp_path / "plugin.yaml"
    config.write_text(yaml.safe_dump(data))
    cluster = cpu_cluster
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", str(config), "--address",
                           cluster["dashboard"], "--wait"], cwd=REPO, env=token_only(cluster), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "planned=6 kept=6 rejected=0 failed=0 skipped=0" in proc.stdout, proc.stdout[-3000:]
    rows = check_invariants(str(tmp_path / "out"), {p.key for p in build_plan(validate_config(data))})
    assert {json.loads(r["meta"])["operator"] for r in rows} == {"posterize"}
