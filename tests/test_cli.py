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


# What Ray itself prints when it reaches the console: its Python loggers ("INFO worker.py:2038 -- ..."), Ray Data's
# dataset blocks, the C++ core's glog lines, worker output forwarded as "(pid=...)", and the notices named in issue 30.
RAY_LINE = re.compile(r"\.py:\d+ -- |\] \w+\.cc:\d+|\(raylet\)|\bpid=\d+\)|Running Dataset|Total Progress|"
                      r"Started a local Ray|Token authentication|No pretrained weights|Execution plan")


@pytest.mark.slow
def test_demo_runs_reads_back_and_resumes(tmp_path, ray_local):
    """The demo config exactly as `make demo` runs it, only with the output moved to a temp dir; its console, piped
    (stderr and stdout in one stream, as CI and job logs see it): a few lines of stylegen's own, none of Ray's, a
    count, and the summary last."""
    import webdataset as wds

    from pipeline.config import load_config
    from pipeline.plan.keys import build_plan
    from tests.invariants import check_invariants

    out = tmp_path / "demo"
    args = ["run", "configs/demo.yaml", "--set", f"output.path={out}"]
    first = subprocess.run([*STYLEGEN, *args], cwd=REPO, env={**os.environ, "STYLEGEN_PROGRESS_S": "2"},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = first.stdout.strip().splitlines()
    assert first.returncode == 0, first.stdout[-3000:]
    assert len(lines) <= 20 and not [ln for ln in lines if RAY_LINE.search(ln)], first.stdout
    assert "\r" not in first.stdout, "piped: plain lines, no bar redrawn in place"
    assert lines.count("warning: CLIP weights are random (clip_pretrained: none or a tiny model): scores are "
                       "meaningless") == 1, first.stdout
    assert any(re.match(r"progress: written \d+/12 ", ln) for ln in lines), first.stdout
    # A line every 2 s, but an unchanged count only once, then once per 30 s heartbeat (and the last line, which
    # may repeat the count before it): a slow first batch on a loaded machine must not push the console past its
    # bound (CI once saw 18 identical `written 0/12` lines).
    counts = [re.match(r"progress: written (\d+)/12 ", ln).group(1) for ln in lines if ln.startswith("progress: ")]
    elapsed = re.search(r"elapsed (?:(\d+)m)?(\d+)s$", lines[-2])
    repeats = sum(a == b for a, b in zip(counts, counts[1:], strict=False))
    assert elapsed and repeats <= 1 + (60 * int(elapsed.group(1) or 0) + int(elapsed.group(2))) // 30, first.stdout
    assert lines[-2].startswith("progress: written 12/12 (100.0%)"), first.stdout
    match = SUMMARY.match(lines[-1])
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

    second = stylegen(*args, "--quiet")  # the summary alone, nothing on stderr
    assert second.returncode == 0, second.stderr[-3000:]
    assert (second.stdout, second.stderr) == ("planned=12 kept=0 rejected=0 failed=0 skipped=12\n", "")


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


# --retry-failed as users type it (issue 25): bare, followed by another option, and with a reason. Three kinds of
# broken input fail with three different reasons; each form must re-plan exactly the failed samples it names.
BROKEN = {"HTML document": b"<!DOCTYPE html><html><body>404</body></html>", "empty file": b"",
          "unrecognised format": bytes(range(256)) * 4}


def _summary(proc) -> tuple[int, ...]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = SUMMARY.match(proc.stdout.strip().splitlines()[-1])
    assert match, proc.stdout[-2000:]
    return tuple(map(int, match.groups()))


def _failed_reasons(out: Path) -> dict[str, str]:
    from tests.invariants import read_index

    return {r["key"]: r["reason"] for r in read_index(str(out)) if r["status"] == "failed"}


def _by_kind(failed: dict[str, str], reasons: tuple[str, ...]) -> dict[str, set[str]]:
    kinds = {kind: {k for k, reason in failed.items() if kind in reason} for kind in reasons}
    assert set().union(*kinds.values()) == set(failed) and all(kinds.values()), failed
    return kinds


def _superseded(out: Path) -> set[str]:
    """Keys of the failed rows that a retry took out of the index (kept aside under _superseded/)."""
    import pyarrow.parquet as pq

    rows = [r for f in (out / "_superseded").rglob("*.parquet") for r in pq.read_table(f).to_pylist()]
    return {r["key"] for r in rows if r["status"] == "failed"}


def _retry_forms(config: Path, elsewhere: Path, out: Path, fix, command: str, reasons: tuple[str, str, str]) -> None:
    """The four forms on one output whose 8 samples are 2 good ones and 2 failed for each of ``reasons``; ``fix``
    repairs the inputs. ``elsewhere`` is the same config writing elsewhere."""
    first = _by_kind(_failed_reasons(out), reasons)
    by_reason_text, by_value_text, rest = reasons
    failed = set().union(*first.values())
    planned = len(failed) + 2

    # Bare and followed by --set (inputs still broken): --set applies, and every failed sample is planned again.
    again = stylegen(command, str(elsewhere), "--retry-failed", "--set", f"output.path={out}", "--quiet")
    assert _summary(again) == (planned, 0, 0, len(failed), 2)
    assert _superseded(out) == failed and set(_failed_reasons(out)) == failed
    assert not any(elsewhere.parent.glob("elsewhere-out*"))

    fix()
    by_reason = stylegen(command, str(config), "--retry-reason", by_reason_text, "--quiet")
    assert _summary(by_reason) == (planned, 2, 0, 0, planned - 2)
    assert set(_failed_reasons(out)) == first[by_value_text] | first[rest]

    by_value = stylegen(command, str(config), "--quiet", f"--retry-failed={by_value_text}")
    assert _summary(by_value) == (planned, 2, 0, 0, planned - 2)
    assert set(_failed_reasons(out)) == first[rest]

    bare = stylegen(command, str(config), "--retry-failed")
    assert _summary(bare) == (planned, 2, 0, 0, planned - 2)
    assert not _failed_reasons(out)


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_retry_failed_forms_in_run(ray_local, samples, tmp_path):
    import shutil

    from pipeline.config import load_config
    from pipeline.generate.run import run

    content, styles = tmp_path / "content", tmp_path / "styles"
    content.mkdir()
    styles.mkdir()
    for path in sorted((samples / "content").iterdir())[:2]:
        shutil.copy(path, content / path.name)
    good = sorted((samples / "style").iterdir())[0]
    shutil.copy(good, styles / good.name)
    broken = {styles / f"broken-{i}.png": data for i, data in enumerate(BROKEN.values())}
    for path, data in broken.items():
        path.write_bytes(data)
    out = tmp_path / "out"
    data = {"output": {"path": str(out), "samples_per_shard": 4}, "content": {"images": str(content)},
            "style": {"images": str(styles)}, "pairing": {"styles_per_content": 4}, "decode": {"max_side": 32},
            "operator": {"name": "color-transfer"}, "scoring": {"clip_model": "tiny:clip"}}
    config = _write(tmp_path / "run.yaml", data)
    elsewhere = _write(tmp_path / "elsewhere.yaml", {**data, "output": {"path": str(tmp_path / "elsewhere-out")}})
    assert run(load_config(config), quiet=True).failed == 6

    def fix():
        for path in broken:
            shutil.copy(good, path)

    _retry_forms(config, elsewhere, out, fix, "run", tuple(BROKEN))


@pytest.mark.slow
def test_retry_failed_forms_in_filter(ray_local, samples, tmp_path):
    from pipeline.config import FilterRunConfig, load_config
    from pipeline.filter.run import curate
    from tests.unit_helpers import wds_tar

    images = sorted((samples / "content").iterdir())[:8]
    # The filter's reasons for these (it decodes as run does): a sample with no image, an HTML page under an image
    # name, a truncated JPEG.
    reasons = ("no image member", "not an image", "truncated")
    jpeg = images[0].read_bytes()
    bad = [{"txt": b"caption only"}, {"jpg": BROKEN["HTML document"], "txt": b"html"},
           {"jpg": jpeg[:len(jpeg) // 2], "txt": b"truncated"}]

    def write_tar(broken: bool) -> None:
        """8 samples in two tars; samples 0-5 broken (two per reason) unless fixed."""
        for t in range(2):
            wds_tar(tmp_path / f"in-{t}.tar", {
                f"s{i}": bad[i // 2] if broken and i < 6 else {image.suffix.lstrip("."): image.read_bytes(),
                                                               "txt": f"caption {i}".encode()}
                for i, image in enumerate(images) if i % 2 == t})

    write_tar(broken=True)
    out = tmp_path / "out"
    data = {"input": {"shards": str(tmp_path / "in-*.tar")}, "output": {"path": str(out)},
            "scoring": {"clip_model": "tiny:clip"}}
    config = _write(tmp_path / "filter.yaml", data)
    elsewhere = _write(tmp_path / "elsewhere.yaml", {**data, "output": {"path": str(tmp_path / "elsewhere-out")}})
    first = curate(load_config(config, schema=FilterRunConfig), quiet=True)
    assert (first.planned, first.failed) == (8, 6), first

    _retry_forms(config, elsewhere, out, lambda: write_tar(broken=False), "filter", reasons)


def test_optional_value_options_never_take_the_next_option():
    from jobs.cli import optional_values

    retry, ship = {"--retry-failed": ""}, {"--ship-deps": "pip"}
    choices = {"--ship-deps": ("pip", "uv")}
    assert optional_values(["c.yaml", "--retry-failed", "--set", "a=b"], retry, {}, {"--set"}) == \
        ["c.yaml", "--retry-failed=", "--set", "a=b"]
    assert optional_values(["--retry-failed=x", "c.yaml", "--retry-failed"], retry, {}, set()) == \
        ["--retry-failed=x", "c.yaml", "--retry-failed="]
    assert optional_values(["--set", "--retry-failed", "c", "--", "--retry-failed"], retry, {}, {"--set"}) == \
        ["--set", "--retry-failed", "c", "--", "--retry-failed"]  # another option's value, and after --
    assert optional_values(["--ship-deps", "uv", "c"], ship, choices, set()) == ["--ship-deps=uv", "c"]
    assert optional_values(["--ship-deps", "c", "--wait"], ship, choices, set()) == ["--ship-deps=pip", "c", "--wait"]
    assert optional_values(["c", "--ship-deps"], ship, choices, set()) == ["c", "--ship-deps=pip"]


def test_submit_ship_deps_bare_before_another_option(tmp_path):
    """``--ship-deps`` alone means pip and leaves the next option alone: here ``--set`` gives the config a ``pip``
    of its own, which ``--ship-deps`` refuses (one way to ship dependencies) before any cluster is asked."""
    from tests.conftest import free_port

    sets = ["--set", f"output.path={tmp_path / 'out'}", "--set", "ray.runtime_env={pip: [numpy]}"]
    for form in (["--ship-deps"], ["--ship-deps", "uv"], ["--ship-deps=uv"]):
        proc = stylegen("submit", "configs/demo.yaml", *form, *sets, "--address", f"http://127.0.0.1:{free_port()}")
        assert_one_line_error(proc, "--ship-deps: ray.runtime_env already sets pip")
    proc = stylegen("submit", "configs/demo.yaml", "--ship-deps=conda", *sets, "--address", "http://127.0.0.1:1")
    assert_one_line_error(proc, "'conda' is not one of pip, uv")


def test_jobs_commands_unreachable_address_is_one_line(tmp_path):
    from tests.conftest import free_port

    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {"RAY_AUTH_TOKEN": "some-token"}
    for args in (["status", "raysubmit_x"], ["logs", "raysubmit_x"], ["stop", "raysubmit_x"],
                 ["submit", "configs/demo.yaml", "--set", f"output.path={tmp_path / 'out'}"]):
        proc = stylegen(*args, "--address", address, env=env)
        assert_one_line_error(proc, f"cannot reach Ray at {address}")
    debug = stylegen("status", "raysubmit_x", "--address", address, "--debug", env=env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
