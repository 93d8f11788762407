"""benchmarks/device_check.py: its CPU smoke path runs every Sissi check; a failed check or no CUDA is non-zero."""

from __future__ import annotations

import torch

from benchmarks import device_check

SMOKE = ["--cpu-smoke", "--skip-compile", "--skip-ad", "--steps", "1", "--panel", "32", "--repeats", "1"]


def test_cpu_smoke_runs_the_checks_and_a_failure_exits_1(monkeypatch, capsys):
    monkeypatch.setitem(device_check.TOLERANCE, torch.float32, -1.0)  # vanilla == off cannot pass
    rc = device_check.main(SMOKE)
    out = capsys.readouterr()
    assert rc == 1 and "FAILED: sissi vanilla == off" in out.err
    for row in ("DSSI branch kernel | yes | cpu_flash_lse", "sissi off | yes", "sissi vanilla | yes",
                "sissi dynamic_norm | yes", "sissi vanilla == off | NO | max abs diff"):
        assert row in out.out, out.out


def test_without_cuda_it_exits_2_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_check.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
