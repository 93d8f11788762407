"""The stylize actor under operator failures that are not one sample's fault (pipeline/generate/failures.py): out of
GPU memory (halve and remember), a poisoned CUDA device (exit, Ray retries on a fresh process, bounded by
``operator.max_restarts``) and a failure storm (``operator.failures`` stops the run with one line)."""

from __future__ import annotations

import json
import signal

import pyarrow as pa
import pytest
import yaml
from PIL import Image

import tests.plugin_ops as plugin_ops
from pipeline.config import ConfigError, validate_config
from pipeline.generate.failures import (
    DEVICE_EXIT,
    DeviceUnusable,
    FailureBreaker,
    RunStopped,
    SystemicFailure,
    device_unusable,
    normalise,
    stop_reason,
)
from pipeline.generate.run import run
from pipeline.generate.stages import Stylizer
from pipeline.io.images import encode_transport
from pipeline.output.store import OutputStore
from pipeline.schema import FAILED, ROW_SCHEMA
from tests.test_cli import stylegen

STYLE = encode_transport(Image.new("RGB", (16, 16), (200, 40, 40)))


def _batch(n: int, failed: int = 0) -> pa.Table:
    rows = [{"key": f"k{i:03d}", "prompt": "a red barn", "seed": i, "style_bytes": STYLE, "content_bytes": None,
             "status": FAILED if i < failed else None, "reason": "content: not found" if i < failed else None}
            for i in range(n)]
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def _stylizer(factory: str, params: dict | None = None, failures: dict | None = None) -> Stylizer:
    operator = {"name": f"tests.plugin_ops:{factory}", "params": params or {}}
    if failures is not None:
        operator["failures"] = failures
    return Stylizer(operator, {"path": "unused"})


def _statuses(table: pa.Table) -> list[str | None]:
    return table.column("status").to_pylist()


# --- out of GPU memory --------------------------------------------------------------------------------------------

def test_out_of_memory_halves_the_batch_and_remembers_the_size_that_fit(caplog):
    stylizer = _stylizer("OomAbove", {"max_items": 2})
    outputs = [stylizer(_batch(8)) for _ in range(8)]  # 64 samples in batches of 8, as the issue probed
    assert all(status is None for out in outputs for status in _statuses(out))  # none failed
    assert all(image is not None for out in outputs for image in out.column("image").to_pylist())
    calls = stylizer.op.calls
    assert calls[:3] == [8, 4, 2] and stylizer.max_items == 2
    assert max(calls[calls.index(2):]) == 2  # after the first size that fit, no call is larger
    assert len(calls) == 2 + 64 // 2  # two failed calls, then 32 of the learned size (today: 8 + 64, none kept)
    warnings = [r for r in caplog.records if "at most 2 items" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


def test_a_sample_that_does_not_fit_alone_fails_saying_so():
    stylizer = _stylizer("OomAbove", {"max_items": 0})
    out = stylizer(_batch(4))
    assert _statuses(out) == [FAILED] * 4
    assert all(r.startswith("out of GPU memory even alone at batch size 1") for r in out.column("reason").to_pylist())
    assert stylizer.op.calls == [4, 2, 1, 1, 1, 1]  # halves down to one, never a per-sample retry of the 4 first


def test_other_errors_keep_the_per_sample_retry():
    stylizer = _stylizer("FailAll", failures={"enabled": False})
    out = stylizer(_batch(3))
    assert _statuses(out) == [FAILED] * 3 and stylizer.op.calls == 1 + 3
    assert set(out.column("reason").to_pylist()) == {"operator error: RuntimeError: weights file corrupt"}
    assert stylizer.max_items is None


# --- a poisoned device --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("message", [
    plugin_ops.ILLEGAL_ACCESS, "CUDA error: device-side assert triggered", "CUBLAS_STATUS_EXECUTION_FAILED when "
    "calling cublasSgemm", "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR", "NCCL error in: ../nccl.cpp:1",
    "CUDA error: unspecified launch failure"])
def test_device_errors_are_recognised_by_their_message(message):
    assert device_unusable(RuntimeError(message)) == f"RuntimeError: {message}"


@pytest.mark.parametrize("message", ["CUDA out of memory. Tried to allocate 2 GiB", "weights file corrupt",
                                     "expected 3 channels"])
def test_other_errors_are_not_device_errors(message):
    assert device_unusable(RuntimeError(message)) is None


def test_a_poisoned_device_exits_the_process_and_fails_no_sample(monkeypatch):
    monkeypatch.setattr(plugin_ops, "PROCESS_CALLS", 0)
    stylizer = _stylizer("PoisonAfterFirst")
    assert _statuses(stylizer(_batch(2))) == [None, None]
    batch = _batch(2)
    with pytest.raises(DeviceUnusable) as err:
        stylizer(batch)
    assert isinstance(err.value, SystemExit)  # Ray restarts an actor whose task raised SystemExit
    assert str(err.value.code).startswith(DEVICE_EXIT + "RuntimeError: " + plugin_ops.ILLEGAL_ACCESS)
    assert "\n" not in str(err.value.code)


def test_the_exit_detail_of_a_dead_actor_becomes_one_line_naming_the_error():
    detail = ("The actor died unexpectedly before finishing this task.\n\tclass_name: MapWorker(Stylizer)\n"
              "Worker exit detail: Worker exits unexpectedly. Worker exits with an exit code "
              f"{DEVICE_EXIT}RuntimeError: {plugin_ops.ILLEGAL_ACCESS}.")
    stopped = stop_reason(RuntimeError(detail), 3)
    assert isinstance(stopped, RunStopped) and not stopped.retry_failed
    assert str(stopped).endswith(f"after 3 replacements of its actor (operator.max_restarts): RuntimeError: "
                                 f"{plugin_ops.ILLEGAL_ACCESS}")
    assert stop_reason(RuntimeError("disk full"), 3) is None


# --- failure storms -----------------------------------------------------------------------------------------------

def test_breaker_trips_when_the_first_samples_all_fail_with_one_reason():
    breaker = FailureBreaker({"min_failures": 5, "window": 20, "ratio": 0.9})
    for i in range(4):
        breaker.record(f"operator error: RuntimeError: weights file corrupt (sample {i}, key abcdef0123)")
    with pytest.raises(SystemicFailure) as err:
        breaker.record("operator error: RuntimeError: weights file corrupt (sample 4, key 99aabbccdd)")
    assert (err.value.failed, err.value.seen) == (5, 5) and "weights file corrupt" in err.value.reason


def test_breaker_trips_on_a_ratio_of_the_recent_window_and_not_below_it():
    breaker = FailureBreaker({"min_failures": 5, "window": 20, "ratio": 0.9})
    for i in range(200):  # one sample in 5 fails: a bad-sample rate, not a storm
        breaker.record("operator error: nan output" if i % 5 == 0 else None)
    for _ in range(17):
        breaker.record("operator error: nan output")
    with pytest.raises(SystemicFailure):  # 18 of the last 20
        breaker.record("operator error: nan output")


def test_breaker_needs_one_reason_and_can_be_switched_off():
    mixed = FailureBreaker({"min_failures": 5, "window": 10, "ratio": 0.9})
    for i in range(100):
        mixed.record(f"operator error: reason {'abc'[i % 3]}")  # three causes: each sample's own problem
    off = FailureBreaker({"enabled": False, "min_failures": 1, "window": 1})
    for _ in range(100):
        off.record("operator error: weights file corrupt")
    assert normalise("failed 3 of 12 at 0x7f3a in 1a2b3c4d5e6f") == normalise("failed 4 of 99 at 0x1 in ffffffffff")


def test_the_stylizer_stops_on_a_storm_without_failing_every_sample():
    stylizer = _stylizer("FailAll", failures={"min_failures": 4, "window": 10, "ratio": 0.9})
    stylizer(_batch(2))  # two failed rows
    with pytest.raises(SystemicFailure, match="weights file corrupt"):
        stylizer(_batch(8))
    assert stylizer.op.calls == (1 + 2) + (1 + 2)  # stopped at the 4th failure, not after 8 more single calls


def test_input_failures_do_not_count_towards_the_breaker():
    stylizer = _stylizer("FailAll", failures={"min_failures": 3, "window": 10, "ratio": 0.9})
    out = stylizer(_batch(10, failed=8))  # 8 undecodable inputs: normal input, never sent to the operator
    assert _statuses(out) == [FAILED] * 10 and stylizer.op.calls == 1 + 2


@pytest.mark.parametrize("failures, message", [
    ({"min_failures": 300}, "min_failures (300) cannot exceed window (200)"),
    ({"ratio": 1.5}, "operator.failures.ratio"),
    ({"stop_after": 5}, "unknown key"),
])
def test_failures_config_is_strict(samples, tmp_path, failures, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(_config(samples, tmp_path / "out", "Tint", failures=failures))


# --- through Ray Data ---------------------------------------------------------------------------------------------

def _config(samples, out, factory, *, limit=16, batch_size=8, params=None, styles=1, **operator):
    return {
        "output": {"path": str(out), "samples_per_shard": 8},
        "content": {"images": str(samples / "content"), "prompts": str(samples / "prompts.txt")},
        "style": {"images": str(samples / "style")},
        "pairing": {"styles_per_content": styles, "limit": limit, "seed": 3},
        "decode": {"max_side": 32},
        "operator": {"name": f"tests.plugin_ops:{factory}", "batch_size": batch_size, "params": params or {},
                     **operator},
        "scoring": {"clip_model": "tiny:clip", "batch_size": 16},
    }


def _index(out) -> list[dict]:
    return OutputStore(str(out)).read_index(["key", "status", "reason", "meta"]).to_pylist()


def test_run_out_of_memory_keeps_every_sample(ray_local, samples, tmp_path):
    summary = run(validate_config(_config(samples, tmp_path / "out", "OomAbove", params={"max_items": 2})),
                  quiet=True)
    assert summary.planned > 8 and summary.kept + summary.rejected == summary.planned and not summary.failed, summary
    sizes = [json.loads(r["meta"])["call_items"] for r in _index(tmp_path / "out")]
    assert max(sizes) == 2, sizes  # made in calls of the learned size, not one by one


def test_run_poisoned_device_is_replaced_and_keeps_every_sample(ray_local, samples, tmp_path):
    cfg = _config(samples, tmp_path / "out", "PoisonAfterFirst")  # 2 batches: one replacement
    summary = run(validate_config(cfg), quiet=True)
    assert summary.planned > 8 and summary.kept + summary.rejected == summary.planned and not summary.failed, summary
    rows = _index(tmp_path / "out")
    assert len(rows) == summary.planned and not [r for r in rows if r["status"] == FAILED]
    pids = {json.loads(r["meta"])["worker"]["pid"] for r in rows}
    assert len(pids) > 1, pids  # the poisoned process was replaced


def _stylegen_run(tmp_path, cfg: dict):
    """``stylegen run`` on ``cfg``: its exit code, its one ``error:`` line (the last line of stderr; Ray's own
    log lines may come before it) and the config's path."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = stylegen("run", str(path), "--quiet")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "RayTaskError" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, errors[0], path


def _failed_rows(out) -> list[dict]:
    return [r for r in _index(out) if r["status"] == FAILED] if (out / "index").exists() else []


def test_run_device_that_keeps_dying_stops_with_one_line(ray_local, samples, tmp_path):
    out = tmp_path / "out"
    cfg = _config(samples, out, "PoisonAfterFirst", limit=4, batch_size=4, params={"from_call": 1}, max_restarts=1)
    with pytest.raises(RunStopped) as err:
        run(validate_config(cfg), quiet=True)
    line = str(err.value)
    assert line.startswith("stopped: the stylize device kept failing after 1 replacements"), line
    assert "\n" not in line and "operator.max_restarts" in line and plugin_ops.ILLEGAL_ACCESS in line, line
    assert not err.value.retry_failed and not _failed_rows(out)


def test_cli_prints_a_stopped_run_as_one_line_with_how_to_resume(samples, tmp_path, monkeypatch):
    """What ``stylegen run`` prints for :class:`RunStopped` (the run itself is the test above, on Ray)."""
    from typer.testing import CliRunner

    import jobs.cli
    import pipeline.generate.run

    def stopped(cfg, **kwargs):
        raise RunStopped(f"stopped: the stylize device kept failing ...: RuntimeError: {plugin_ops.ILLEGAL_ACCESS}",
                         False)

    monkeypatch.setattr(pipeline.generate.run, "run", stopped)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_config(samples, tmp_path / "out", "PoisonAfterFirst")))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = CliRunner().invoke(jobs.cli.app, ["run", str(path), "--quiet"])
    finally:  # the command installs its own SIGINT/SIGTERM handlers: pytest keeps its own
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines == [f"error: stopped: the stylize device kept failing ...: RuntimeError: "
                     f"{plugin_ops.ILLEGAL_ACCESS}; fix it, then resume with `stylegen run {path}`"], result.output


def test_cli_failure_storm_stops_early_with_one_line_and_how_to_resume(samples, tmp_path):
    out = tmp_path / "out"
    cfg = _config(samples, out, "FailAll", limit=40, styles=3, batch_size=2,
                  failures={"min_failures": 6, "window": 20, "ratio": 0.9})
    code, line, path = _stylegen_run(tmp_path, cfg)
    assert code == 1, line
    assert line.startswith("error: stopped: operator failures look systematic: 6 of the last 6 samples"), line
    assert "weights file corrupt" in line and line.endswith(f"`stylegen run {path} --retry-failed`"), line
    assert len(_failed_rows(out)) < 10  # 40 samples planned; the storm stopped at the 6th failure
