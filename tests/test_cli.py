"""The CLI contract (docs/architecture.md §3): exit codes, one-line errors, the summary line, tiny models."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STYLEGEN = [sys.executable, "-m", "jobs.cli"]
SUMMARY = re.compile(r"^planned=(\d+) kept=(\d+) rejected=(\d+) failed=(\d+) skipped=(\d+)$")


def stylegen(*args, env=None, timeout=300):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*STYLEGEN, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def write_config(path: Path, **overrides) -> Path:
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data))
    return path


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "overrides, needles",
    [
        ({"operator": {"batchsize": 3}}, ["operator.batchsize", "unknown key"]),
        ({"operator": {"batch_size": "many"}}, ["operator.batch_size"]),
        ({"operator": {"name": "no-such-op"}}, ["operator.name", "no-such-op"]),
        ({"scoring": {"actors": [3, 1]}}, ["scoring.actors"]),
        ({"output": {"samples_per_shard": -5}}, ["output.samples_per_shard"]),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, overrides, needles):
    cfg = write_config(tmp_path / "bad.yaml", **overrides)
    for command in ("validate", "run"):
        assert_one_line_error(stylegen(command, str(cfg)), str(cfg), *needles)


@pytest.mark.parametrize(
    "operator, needles",
    [
        ({"name": "color-transfer", "params": {"strenght": 0.5}}, ["'strenght'"]),
        ({"name": "sissi", "model": "tiny:flux-fill", "params": {"dssi": {"mod": "dynamic"}}}, ["dssi.mod"]),
        ({"name": "ad-t2i", "model": "tiny:sd15", "params": {"stepz": 3}}, ["'stepz'"]),
        ({"name": "ad-transfer", "model": "tiny:sd15", "params": {"method": "optimize", "guidance_scale": 3}},
         ["'guidance_scale'", "'optimize'"]),
        ({"name": "ad-transfer", "model": "tiny:sd15", "params": {"adain": True}}, ["'adain'", "'optimize'"]),
        ({"name": "ad-texture", "model": "tiny:sd15", "params": {"stride": 8}}, ["'stride'", "'optimize'"]),
        ({"name": "ad-texture", "model": "tiny:sd15", "params": {"method": "sample", "guidance_scale": 2}},
         ["'guidance_scale'"]),
        ({"name": "ad-t2i", "model": "tiny:sd15", "params": {"precision": "fp32", "feature_chunk": 4}},
         ["'feature_chunk'", "fast mode"]),
        ({"name": "ad-t2i", "model": "tiny:flux", "params": {"negative_prompt": "blurry"}},
         ["'negative_prompt'", "FLUX"]),
        ({"name": "ad-t2i", "model": "tiny:sd15", "params": {"max_sequence_length": 64}},
         ["'max_sequence_length'", "FLUX"]),
    ],
)
def test_unknown_or_inapplicable_operator_param_exits_2_before_any_actor(tmp_path, operator, needles):
    cfg = write_config(tmp_path / "bad.yaml", operator=operator, output={"path": str(tmp_path / "out")})
    for command in ("validate", "run"):
        proc = stylegen(command, str(cfg))
        assert_one_line_error(proc, str(cfg), "operator.params", *needles)
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_missing_source_and_bad_override(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", style={"images": str(tmp_path / "nowhere")})
    assert_one_line_error(stylegen("run", str(cfg)), str(cfg), "style.images", "nowhere")
    assert_one_line_error(stylegen("validate", str(cfg)), str(cfg), "style.images", "nowhere")
    assert_one_line_error(stylegen("validate", str(REPO / "configs/demo.yaml"), "--set", "pairing"), "--set")
    assert_one_line_error(stylegen("validate", str(tmp_path / "missing.yaml")), "missing.yaml")
    (tmp_path / "broken.yaml").write_text("output: [unclosed\n")
    assert_one_line_error(stylegen("validate", str(tmp_path / "broken.yaml")), "invalid YAML")


def test_validate_reports_plan_size():
    proc = stylegen("validate", "configs/demo.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "planned=12" in proc.stdout


@pytest.mark.slow
def test_demo_runs_reads_back_and_resumes(tmp_path, ray_local):
    """The demo config exactly as `make demo` runs it, only with the output moved to a temp dir."""
    import webdataset as wds

    from pipeline.config import load_config
    from pipeline.plan import build_plan
    from tests.invariants import check_invariants

    out = tmp_path / "demo"
    args = ["run", "configs/demo.yaml", "--set", f"output.path={out}", "--quiet"]
    first = stylegen(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    match = SUMMARY.match(first.stdout.strip().splitlines()[-1])
    assert match, first.stdout
    planned, kept, rejected, failed, skipped = map(int, match.groups())
    assert (planned, skipped) == (12, 0) and kept > 0 and kept + rejected + failed == 12

    plan = build_plan(load_config(REPO / "configs/demo.yaml", [f"output.path={out}"]))
    rows = check_invariants(str(out), {p.key for p in plan})  # includes a tarfile read of every shard
    kept_keys = sorted(r["key"] for r in rows if r["status"] == "kept")
    assert len(kept_keys) == kept
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    assert sorted(s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False)) == kept_keys
    assert sorted(r["__key__"] for r in ray_local.data.read_webdataset(tars, decoder=None).take_all()) == kept_keys

    second = stylegen(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.strip().splitlines()[-1] == "planned=12 kept=0 rejected=0 failed=0 skipped=12"


def test_models_tiny_clip_writes_loadable_model(tmp_path):
    proc = stylegen("models", "tiny", "clip", str(tmp_path / "clip"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "clip" / "open_clip_model.safetensors").is_file()
    from operators.clip_score import ClipScorer

    scorer = ClipScorer(str(tmp_path / "clip"), "none")
    assert scorer.embed_texts(["a fox"]).shape == (1, 64)
    assert_one_line_error(stylegen("models", "tiny", "nope", str(tmp_path / "x")), "nope")


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_validate(config):
    proc = stylegen("validate", f"configs/{config}")
    assert proc.returncode == 0, proc.stderr
    assert "planned=" in proc.stdout


def test_validate_accepts_filter_configs_and_convert_head(tmp_path):
    """Filter configs are told apart by their keys or ``kind: filter``; validate prints planned=N for them."""
    import torch
    from PIL import Image

    from tests.unit_helpers import png_bytes, wds_tar

    for t in range(2):
        wds_tar(tmp_path / f"part-{t}.tar", {f"s{i}": {"png": png_bytes(Image.new("RGB", (8, 8), (i, t, 0))),
                                                       "txt": b"a square"} for i in range(3 + t)})
    head = torch.nn.Linear(64, 1)
    torch.save(head.state_dict(), tmp_path / "linear.pth")
    converted = stylegen("models", "convert-head", str(tmp_path / "linear.pth"), str(tmp_path / "q.safetensors"))
    assert converted.returncode == 0 and "64 -> 1" in converted.stdout, converted.stderr
    cfg = {"input": {"shards": str(tmp_path / "part-*.tar")}, "output": {"path": str(tmp_path / "out")},
           "scoring": {"clip_model": "tiny:clip", "heads": {"quality": {"weights": str(tmp_path / "q.safetensors")},
                                                             "aesthetic": {"weights": "tiny"}}},
           "filter": {"min_scores": {"quality": 0.1}, "max_scores": {"aesthetic": 9}}}
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "k.yaml").write_text(yaml.safe_dump({"kind": "filter", **cfg}))
    for name in ("f.yaml", "k.yaml"):
        proc = stylegen("validate", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().endswith("valid filter config; planned=7"), proc.stdout
    assert not (tmp_path / "out").exists()
    assert_one_line_error(stylegen("validate", str(tmp_path / "f.yaml"), "--set", "filter.min_scores.nsfw=0.5"),
                          "filter.min_scores.nsfw: no such head in scoring.heads (aesthetic, quality)")
    assert_one_line_error(stylegen("validate", str(tmp_path / "f.yaml"), "--set", "input.shards=/nowhere/*.tar"),
                          "input.shards")
    assert_one_line_error(stylegen("models", "convert-head", str(tmp_path / "nope.pth"),
                                   str(tmp_path / "x.safetensors")), "nope.pth: not found")
