"""Whole runs on hostile inputs (docs/architecture.md §7): every run finishes (exit 0), every input is accounted for by
a row whose reason explains it, the output invariants of docs/architecture.md §5 hold, nothing is written outside
``output.path``, and no credential reaches logs, ``run.json``, the index or the shards.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import validate_config
from pipeline.generate.run import run
from pipeline.plan.keys import build_plan
from tests.hostile_corpus import hostile_content, hostile_tar, textured
from tests.invariants import check_invariants

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
KEY = re.compile(r"^[0-9a-f]{16}$")


def close(pixel, expected, tol=40) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected, strict=True))


def styles(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        textured((32, 32), seed=10 + i).save(dest / f"style{i}.png")
    return dest


def config(out: Path, content: dict, style: Path, **sections):
    data = {
        "output": {"path": str(out), "samples_per_shard": 8, "include_inputs": True},
        "content": content,
        "style": {"images": str(style)},
        "decode": {"max_side": 64},
        "operator": {"name": "color-transfer", "batch_size": 4},
        "scoring": {"clip_model": "tiny:clip", "batch_size": 8},
    }
    for name, value in sections.items():
        data.setdefault(name, {}).update(value)
    return validate_config(data)


def shard_members(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} over every shard; member names must be ``<16 hex>.<ext>``."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                assert KEY.match(key) and member.isfile(), member.name
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def check_rows(rows: list[dict], expect: dict, id_column: str = "content_id") -> dict[str, dict]:
    by_id = {r[id_column]: r for r in rows}
    assert set(by_id) == set(expect)
    for cid, exp in expect.items():
        row = by_id[cid]
        assert KEY.match(row["key"]), row["key"]
        assert row["status"] == exp.status, (cid, row["status"], row["reason"])
        if exp.status == "failed":
            assert exp.reason in row["reason"], (cid, row["reason"])
    return by_id


def test_hostile_images_and_prompts_run_to_completion(ray_local, tmp_path):
    manifest, expect, prompts = hostile_content(tmp_path / "content")
    out = tmp_path / "out"
    cfg = config(out, {"images": str(manifest)}, styles(tmp_path / "style"))
    plan = build_plan(cfg)
    summary = run(cfg, quiet=True)
    n_failed = sum(e.status == "failed" for e in expect.values())
    assert (summary.planned, summary.kept, summary.rejected, summary.failed) == (
        len(expect), len(expect) - n_failed, 0, n_failed)

    by_id = check_rows(check_invariants(str(out), {p.key for p in plan}), expect)
    samples = shard_members(out)
    for cid, exp in expect.items():
        row = by_id[cid]
        if exp.status != "kept":
            continue
        sample = samples[row["key"]]
        assert row["prompt"] == prompts[cid], cid
        assert sample["txt"].decode("utf-8") == (prompts[cid] or "")
        meta = json.loads(sample["json"])
        assert meta["prompt"] == prompts[cid]
        if prompts[cid] is not None:
            assert meta["operator"]["prompt_truncated"] is (cid == "prompt-long"), cid
        # the decoded input as the pipeline used it: orientation, alpha over white, CMYK, 16-bit, palette...
        content = Image.open(io.BytesIO(sample["content.png"]))
        assert content.mode == "RGB" and content.size == (exp.size or (48, 48)), cid
        for xy, color in exp.pixels:
            assert close(content.getpixel(xy), color), (cid, xy, content.getpixel(xy), color)
        output = Image.open(io.BytesIO(sample["png"]))
        assert output.size == content.size and output.getextrema() != ((0, 0),) * 3, cid
    assert by_id["prompt-long"]["clip_content"] is not None  # 3,000 characters scored (CLIP sees 77 tokens)
    assert by_id["prompt-empty"]["clip_content"] is None  # no caption: no content score

    run_json = json.loads((out / "run.json").read_text())
    assert run_json["dataset"]["complete"] is True and run_json["dataset"]["failed"] == n_failed


def _files(root: Path, skip: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*") if p.is_file() and skip not in p.parents}


def test_hostile_tar_uses_readable_samples_and_writes_only_under_output(ray_local, tmp_path, caplog):
    inputs = tmp_path / "in"
    inputs.mkdir()
    expect = hostile_tar(inputs / "hostile.tar", tmp_path / "escape")
    out = tmp_path / "out"
    cfg = config(out, {"images": str(inputs / "hostile.tar")}, styles(tmp_path / "style"),
                 pairing={"styles_per_content": 2})
    before = _files(tmp_path, out)
    cwd_before = set(os.listdir(REPO))
    with caplog.at_level("WARNING", logger="pipeline"):
        plan = build_plan(cfg)
        summary = run(cfg, quiet=True)
    assert "hostile.tar is truncated or corrupt" in caplog.text

    kept = sum(e.status == "kept" for e in expect.values())
    assert (summary.planned, summary.kept, summary.failed) == (2 * len(expect), 2 * kept, 2 * (len(expect) - kept))
    rows = check_invariants(str(out), {p.key for p in plan})
    for style in ("style0.png", "style1.png"):
        check_rows([r for r in rows if r["style_id"] == style], expect)
    prompts = {r["content_id"]: r["prompt"] for r in rows}
    assert prompts["hostile.tar/good0"] == "a good sample with a NUL"
    assert prompts["hostile.tar/good1"] == "caption from json"
    assert len(shard_members(out)) == 2 * kept

    assert _files(tmp_path, out) == before, "a file was written outside output.path"
    assert not (tmp_path / "escape").exists() and not (tmp_path / "climb.png").exists()
    assert set(os.listdir(REPO)) == cwd_before


def stylegen(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.s3
def test_cli_environment_errors_exit_2_with_one_line(s3_env, tmp_path):
    """Config errors of every kind are covered in-process (test_hostile_inputs); here the CLI end of each path."""
    (tmp_path / "a-file").write_text("not a folder")
    style = styles(tmp_path / "style")
    base = ["run", "configs/demo.yaml", "--set", f"style.images={style}", "--set", f"output.path={tmp_path / 'o'}"]
    s3 = s3_env["env"]
    closed = {**s3, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}
    cases = [
        ((*base, "--set", "operator.model=tiny:nope"), {}, ("operator.model", "tiny:nope")),
        ((*base, "--set", f"output.path={tmp_path / 'a-file' / 'out'}"), {}, ("output.path", "a-file/out")),
        ((*base, "--set", "output.path=s3://no-such-bucket-6/out"), s3, ("output.path", "s3://no-such-bucket-6/out")),
        ((*base, "--set", "style.images=s3://no-such-bucket-6/style/"), s3, ("style.images", "no-such-bucket-6")),
        ((*base, "--set", f"style.images=s3://{s3_env['bucket']}/style/"), closed, ("style.images", "cannot reach")),
    ]
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda case: stylegen(*case[0], env=case[1], timeout=120), cases))
    for (_args, _, needles), proc in zip(cases, procs, strict=True):
        assert_one_line_error(proc, *needles)
    debug = stylegen(*base, "--set", f"output.path={tmp_path / 'a-file' / 'out'}", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "is a file, not a folder" in debug.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.s3
def test_cli_run_on_s3_leaks_no_credentials(s3_env, tmp_path):
    """A real CLI run (--debug: driver, Ray and worker logs all on stderr) with a distinctive secret in the
    environment: the secret appears in no log line, run.json, index or shard; broken inputs fail alone."""
    fs, bucket = s3_env["fs"], s3_env["bucket"]
    secret = f"SeCrEt-{uuid.uuid4().hex}"
    key_id = f"AKIA{uuid.uuid4().hex[:16].upper()}"
    content = tmp_path / "content"
    content.mkdir()
    textured((40, 40), seed=1).save(content / "good.png")
    (content / "page.jpg").write_text("<html><body>denied</body></html>")
    for path in styles(tmp_path / "style").iterdir():
        fs.put_file(str(path), f"{bucket}/style/{path.name}")
    out = f"s3://{bucket}/out"
    env = {**s3_env["env"], "AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": key_id}
    proc = stylegen("run", "configs/demo.yaml", "--set", f"output.path={out}", "--set", f"content.images={content}",
                    "--set", f"style.images=s3://{bucket}/style/", "--set", "scoring.clip_model=tiny:clip",
                    "--set", "pairing.styles_per_content=1", "--debug", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "planned=2 kept=1 rejected=0 failed=1 skipped=0"
    assert "INFO" in proc.stderr  # logs were on, so the check below means something

    written = [proc.stdout, proc.stderr]
    for path in fs.find(f"{bucket}/out"):
        data = fs.cat_file(path)
        if path.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                names = tar.getnames()
            assert names and all(KEY.match(n.split(".", 1)[0]) for n in names), names
        written.append(data.decode("utf-8", errors="replace"))
    assert any("not an image: HTML document" in w for w in written[2:])  # the failed row's reason is there
    for text in written:
        assert secret not in text and key_id not in text
