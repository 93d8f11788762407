"""S3 input and output against a real local S3 endpoint (moto's ThreadedMotoServer on 127.0.0.1)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest
import webdataset as wds

from pipeline.io.sources import read_images, read_prompts
from pipeline.output.store import OutputStore, commit_rows
from tests.invariants import check_invariants

pytestmark = pytest.mark.s3
REPO = Path(__file__).resolve().parents[1]


def _upload_inputs(fs, bucket: str, samples: Path) -> None:
    for path in sorted((samples / "style").iterdir())[:4]:
        fs.put_file(str(path), f"{bucket}/style/{path.name}")
    fs.pipe_file(f"{bucket}/prompts.txt", (samples / "prompts.txt").read_bytes())
    contents = sorted((samples / "content").iterdir())
    for shard in range(2):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i, path in enumerate(contents[shard * 2 : shard * 2 + 2]):
                tar.add(path, arcname=f"c{shard}{i}{path.suffix.lower()}")
        fs.pipe_file(f"{bucket}/content/shard-{shard}.tar", buf.getvalue())


def test_s3_sources_are_listed_and_ranged(s3_env, samples):
    fs, bucket = s3_env["fs"], s3_env["bucket"]
    _upload_inputs(fs, bucket, samples)
    styles = read_images(f"s3://{bucket}/style/", "style.images")
    assert [s.id for s in styles] == sorted(p.name for p in (samples / "style").iterdir())[:4]
    contents = read_images(f"s3://{bucket}/content/shard-{{0..1}}.tar", "content.images")
    assert len(contents) == 4 and all(c.image.size > 0 for c in contents)
    from pipeline.io.fs import read_range

    first = sorted((samples / "content").iterdir())[0]
    assert read_range(contents[0].image.url, contents[0].image.offset, contents[0].image.size) == first.read_bytes()
    prompts = read_prompts(f"s3://{bucket}/prompts.txt")
    assert prompts[0].prompt == (samples / "prompts.txt").read_text().splitlines()[0].strip()


@pytest.mark.slow
def test_run_with_s3_input_and_output(s3_env, samples, tmp_path):
    fs, bucket = s3_env["fs"], s3_env["bucket"]
    _upload_inputs(fs, bucket, samples)
    out = f"s3://{bucket}/out/run1"
    args = [
        "run", "configs/demo.yaml",
        "--set", f"output.path={out}",
        "--set", f"content.images=s3://{bucket}/content/shard-{{0..1}}.tar",
        "--set", f"content.prompts=s3://{bucket}/prompts.txt",
        "--set", f"style.images=s3://{bucket}/style/",
        "--set", "scoring.clip_model=tiny:clip",
        "--quiet",
    ]
    env = {**os.environ, **s3_env["env"]}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "planned=8 kept=8 rejected=0 failed=0 skipped=0"

    from pipeline.config import load_config
    from pipeline.plan.keys import build_plan

    cfg = load_config(REPO / "configs/demo.yaml", [a for a in args[3:-1:2]])
    check_invariants(out, {p.key for p in build_plan(cfg)})
    tars = [f"s3://{p}" for p in fs.ls(f"{bucket}/out/run1/shards")]
    local = []
    for i, url in enumerate(tars):
        dest = tmp_path / f"{i}.tar"
        fs.get_file(url, str(dest))
        local.append(str(dest))
    assert len(list(wds.WebDataset(local, shardshuffle=False))) == 8
    assert fs.exists(f"{bucket}/out/run1/run.json")
    assert "testing-secret" not in fs.cat_file(f"{bucket}/out/run1/run.json").decode()

    again = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.stdout.strip().splitlines()[-1] == "planned=8 kept=0 rejected=0 failed=0 skipped=8"
    status = subprocess.run([sys.executable, "-m", "jobs.cli", "status", out], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and status.stdout.startswith(f"{out}: finished at "), status.stdout + status.stderr
    assert "holds 8/8 (kept=8 rejected=0 failed=0)" in status.stdout, status.stdout


def _rows(n: int) -> list[dict]:
    from PIL import Image

    from pipeline.io.images import encode_image

    png = encode_image(Image.new("RGB", (8, 8), (10, 20, 30)))
    return [{"key": f"{i:016x}", "status": "kept", "reason": None, "prompt": "p", "content_id": "c",
             "style_id": "s", "seed": i, "image": png, "meta": '{"operator": "x"}', "clip_content": 0.1,
             "clip_style": 0.2} for i in range(n)]


def test_failed_index_upload_leaves_orphan_that_restart_quarantines(s3_env, monkeypatch):
    from pipeline.config import OutputConfig
    from pipeline.output.integrity import open_output

    out = f"s3://{s3_env['bucket']}/out/crash"
    store = OutputStore(out)
    store.prepare()
    real_put = store.fs.put_file

    def flaky_put(lpath, rpath, **kw):
        if rpath.endswith(".parquet"):
            raise ConnectionError("injected: connection reset during index upload")
        return real_put(lpath, rpath, **kw)

    monkeypatch.setattr(store.fs, "put_file", flaky_put)
    with pytest.raises(ConnectionError):
        commit_rows(store, _rows(3), OutputConfig(path=out, samples_per_shard=8))
    monkeypatch.setattr(store.fs, "put_file", real_put)
    assert len(store.shard_files()) == 1 and store.index_files() == []
    assert store.done_keys() == set()  # not committed: the samples are not done

    assert open_output(OutputStore(out), None)["orphans_removed"] == 1
    assert store.shard_files() == []
    assert len(s3_env["fs"].find(f"{s3_env['bucket']}/out/crash/_quarantine")) == 1  # moved aside, not deleted
    commit_rows(store, _rows(3), OutputConfig(path=out, samples_per_shard=8))
    check_invariants(out, {r["key"] for r in _rows(3)})
    assert isinstance(store.read_index(), pa.Table)


def test_failed_shard_upload_leaves_nothing_visible(s3_env, monkeypatch):
    from pipeline.config import OutputConfig

    out = f"s3://{s3_env['bucket']}/out/tarfail"
    store = OutputStore(out)
    store.prepare()
    real_call = store.fs._call_s3

    async def failing_call(method, *args, **kwargs):
        if method in ("put_object", "upload_part") and str(kwargs.get("Key", "")).endswith(".tar"):
            raise ConnectionError("injected: connection reset during shard upload")
        return await real_call(method, *args, **kwargs)

    monkeypatch.setattr(store.fs, "_call_s3", failing_call)
    with pytest.raises(ConnectionError):
        commit_rows(store, _rows(4), OutputConfig(path=out, samples_per_shard=8))
    monkeypatch.setattr(store.fs, "_call_s3", real_call)
    assert store.shard_files() == [] and store.index_files() == []
    commit_rows(store, _rows(4), OutputConfig(path=out, samples_per_shard=8))
    check_invariants(out, {r["key"] for r in _rows(4)})


def test_multipart_upload_failure_is_aborted_not_published(s3_env, monkeypatch, tmp_path):
    """The guarantee the sink relies on for big shards: s3fs aborts a failed multipart upload."""
    fs, bucket = s3_env["fs"], s3_env["bucket"]
    big = tmp_path / "big.tar"
    big.write_bytes(os.urandom(12 * 2**20))
    real_call = fs._call_s3
    parts = []

    async def failing_call(method, *args, **kwargs):
        if method == "upload_part":
            parts.append(kwargs.get("PartNumber"))
            if len(parts) == 2:
                raise ConnectionError("injected: second part lost")
        return await real_call(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", failing_call)
    with pytest.raises(ConnectionError):
        fs.put_file(str(big), f"{bucket}/shards/big.tar", chunksize=5 * 2**20)
    monkeypatch.setattr(fs, "_call_s3", real_call)
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/shards/big.tar")
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
