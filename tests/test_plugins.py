"""Operators by import path (``operator.name: "package.module:Factory"``): validated and imported only from a
config the user gave, built on the actors like a registered operator, and never imported from an output's
``run.json``."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, validate_config
from pipeline.generate.run import run
from pipeline.plan.keys import build_plan
from tests.invariants import check_invariants
from tests.test_run import tar_images

TINT = "tests.plugin_ops:Tint"


def _config(samples, out, name=TINT, **operator):
    return {
        "output": {"path": str(out), "samples_per_shard": 2},
        "content": {"images": str(samples / "content"), "prompts": str(samples / "prompts.txt")},
        "style": {"images": str(samples / "style")},
        "pairing": {"limit": 4, "seed": 3},
        "decode": {"max_side": 64},
        "operator": {"name": name, "batch_size": 2, **operator},
        "scoring": {"clip_model": "tiny:clip"},
    }


@pytest.mark.parametrize("name, message", [
    ("tests.no_such_module:Op", "cannot import 'tests.no_such_module'"),
    ("tests.plugin_ops:Nope", "has no 'Nope'"),
    ("tests.plugin_ops:np", "is not callable"),
    ("tests/plugin_ops.py:Tint", "unknown operator"),
    ("os.path", "unknown operator"),
])
def test_plugin_path_refused_with_one_line(samples, tmp_path, name, message):
    with pytest.raises(ConfigError) as err:
        validate_config(_config(samples, tmp_path / "out", name))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_plugin_check_params_runs_at_validation(samples, tmp_path):
    with pytest.raises(ConfigError, match="tint: unknown param 'colour'"):
        validate_config(_config(samples, tmp_path / "out", params={"colour": 1}))
    cfg = validate_config(_config(samples, tmp_path / "out", params={"amount": 0.25}))
    assert cfg.operator.params == {"amount": 0.25}


def test_plugin_shipped_by_runtime_env_is_imported_on_the_actors_only(samples, tmp_path):
    """A module shipped with ``ray.runtime_env`` (py_modules) need not import on the driver."""
    data = _config(samples, tmp_path / "out", "my_ops.styles:Paint")
    with pytest.raises(ConfigError, match="cannot import 'my_ops.styles'"):
        validate_config(data)
    data["ray"] = {"runtime_env": {"py_modules": [str(tmp_path / "my_ops")]}}
    assert validate_config(data).operator.name == "my_ops.styles:Paint"


def test_plugin_runs_through_the_pipeline_and_its_name_keys_the_samples(ray_local, samples, tmp_path):
    cfg = validate_config(_config(samples, tmp_path / "out", params={"amount": 0.5}))
    builtin = validate_config(_config(samples, tmp_path / "other", "color-transfer"))
    plan = build_plan(cfg)
    assert {p.key for p in plan}.isdisjoint({p.key for p in build_plan(builtin)})  # the operator is in the key
    summary = run(cfg, quiet=True)
    assert (summary.kept, summary.failed) == (4, 0), summary
    rows = check_invariants(str(tmp_path / "out"), {p.key for p in plan})
    assert all(json.loads(r["meta"])["operator"] == "tint" for r in rows)
    for key, data in tar_images(tmp_path / "out").items():  # the plug-in's pixels, not a built-in's
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert image.shape[2] == 3 and image.std() > 0, key
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["config"]["operator"]["name"] == TINT
    assert run(cfg, quiet=True).skipped == 4  # resumable like any operator


def test_run_json_naming_a_plugin_is_never_imported(samples, tmp_path, monkeypatch):
    """``reproduce`` and ``report`` read a config back from an output, which anyone may have edited: a plug-in it
    names is not imported (the user passes their own config to reproduce one)."""
    import sys

    from pipeline.output.store import OutputStore
    from pipeline.review.reproduce import NotReproducible, load_run_config

    out = tmp_path / "out"
    out.mkdir()
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "evil_ops.py").write_text("import pathlib\npathlib.Path(__file__).with_name('RAN').touch()\n"
                                         "class Op:\n    pass\n")
    monkeypatch.syspath_prepend(str(planted))
    data = _config(samples, out, "evil_ops:Op")
    (out / "run.json").write_text(json.dumps({"config": data}))
    with pytest.raises(NotReproducible, match="never imports code that an output names"):
        load_run_config(OutputStore(str(out)))
    assert validate_config(data, untrusted=True).operator.name == "evil_ops:Op"
    assert not (planted / "RAN").exists() and "evil_ops" not in sys.modules
    validate_config(data)  # the same config given by the user is imported: the module ran
    assert (planted / "RAN").exists()


def test_readme_plugin_example_runs_from_the_users_folder(samples, tmp_path):
    """The README's example, copied into a user's folder and run with ``stylegen run`` from there (embedded Ray):
    every sample kept, posterized (few distinct levels per channel), ``meta`` from the plug-in."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from tests.plugin_ops import readme_plugin

    repo = Path(__file__).resolve().parents[1]
    data = readme_plugin(tmp_path, str(tmp_path / "out"), samples)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(data))
    env = {**__import__("os").environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "cfg.yaml", "--quiet"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "planned=6 kept=6 rejected=0 failed=0 skipped=0" in proc.stdout, proc.stdout
    rows = check_invariants(str(tmp_path / "out"), {p.key for p in build_plan(validate_config(data))})
    assert {json.loads(r["meta"])["operator"] for r in rows} == {"posterize"}
    for key, blob in tar_images(tmp_path / "out").items():
        levels = np.unique(np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))[..., 0])
        assert len(levels) <= 8, (key, levels)  # 3 bits


def test_a_gpu_stylize_actor_takes_the_next_batch_while_the_device_holds_one(samples, tmp_path):
    """On a GPU pool (Ray with a logical GPU, in its own process), the actor runs the next batch's CPU work on a
    second thread while the operator holds the device (``tests.plugin_ops:TimedHold`` records each call's
    interval and thread in ``meta``): calls come from two threads, and never overlap on the device. On the same
    threaded pool, a device poisoned after its first call exits its process for Ray to replace (the exit works
    from the actor's second thread too): every sample kept, none failed, two processes."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    data = _config(samples, tmp_path / "out", "tests.plugin_ops:TimedHold", params={"seconds": 0.5},
                   num_gpus=1, batch_size=1)
    data["pairing"]["limit"] = 6
    (tmp_path / "cfg.json").write_text(json.dumps(data))
    poison = _config(samples, tmp_path / "poisoned", "tests.plugin_ops:PoisonAfterFirst", num_gpus=1, batch_size=4)
    poison["pairing"]["limit"] = 8  # two batches: one replacement
    (tmp_path / "poison.json").write_text(json.dumps(poison))
    script = textwrap.dedent(f"""
        import json, ray
        from pipeline.config import validate_config
        from pipeline.generate.run import run
        ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
        for name in ("cfg.json", "poison.json"):
            print(run(validate_config(json.load(open({str(tmp_path)!r} + "/" + name))), quiet=True).line())
    """)
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metas = [json.loads(r["meta"]) for r in check_invariants(str(tmp_path / "out"), {p.key for p in
                                                                                     build_plan(validate_config(data))})]
    calls = sorted({(m["call_start"], m["call_end"], m["thread"]) for m in metas})
    assert len(calls) == 6 and len({m["worker"]["pid"] for m in metas}) == 1
    assert all(end <= start for (_, end, _), (start, _, _) in zip(calls, calls[1:], strict=False)), calls
    assert len({thread for _, _, thread in calls}) == 2, calls
    rows = check_invariants(str(tmp_path / "poisoned"), {p.key for p in build_plan(validate_config(poison))})
    assert len(rows) == 8 and {r["status"] for r in rows} == {"kept"}, [r["reason"] for r in rows]
    assert len({json.loads(r["meta"])["worker"]["pid"] for r in rows}) == 2
