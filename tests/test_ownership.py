"""Safe with other people's data, the output side (issue 26): an output is stylegen's only when stylegen made it
(the ``.stylegen`` marker), nothing stylegen did not write is deleted or overwritten, no input is read from under
the output (and no output sits inside a source), layout entries and the lease are never followed through links
or FIFOs, the S3 lease trusts the store's clock, and a store that does not answer is not damage.

Every test runs real things (the CLI in a subprocess, real files, moto S3, a proxy on 127.0.0.1) and checks that
the user's files are byte-identical afterwards.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline.config import OutputConfig
from pipeline.io.images import encode_image
from pipeline.output.ownership import MARKER, NotOurs, check_overlap, check_owned, claim
from pipeline.output.store import OutputStore, StoreUnavailable, commit_rows
from tests.data_paths import samples_dir
from tests.flaky_proxy import FlakyProxy

REPO = Path(__file__).resolve().parents[1]
SAMPLES = samples_dir()


# ---- helpers ----------------------------------------------------------------------------------------------------
def stylegen(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root`` (links not followed): path -> bytes, ``link -> target`` or ``dir``."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = path.read_bytes()
    return out


def s3_snapshot(fs, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in fs.find(prefix)}


def run_config(path: Path, out: str, **sections) -> Path:
    data = {
        "output": {"path": out, "samples_per_shard": 4},
        "content": {"images": str(SAMPLES / "content")},
        "style": {"images": str(SAMPLES / "style")},
        "decode": {"max_side": 64},
        "operator": {"name": "color-transfer", "batch_size": 4},
        "scoring": {"clip_model": "tiny:clip", "batch_size": 8},
    }
    for name, value in sections.items():
        data.setdefault(name, {}).update(value)
    path.write_text(yaml.safe_dump(data))
    return path


def filter_config(path: Path, shards: str, out: str) -> Path:
    path.write_text(yaml.safe_dump({"kind": "filter", "input": {"shards": shards},
                                    "output": {"path": out, "samples_per_shard": 4},
                                    "scoring": {"clip_model": "tiny:clip", "batch_size": 8}}))
    return path


def foreign_tar(path: Path, n: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    png = encode_image(Image.new("RGB", (8, 8), (200, 10, 10)))
    with tarfile.open(path, "w") as tar:  # someone else's tar: not stylegen's writer, which refuses such names
        for i in range(n):
            for ext, data in (("png", png), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"s{i:02d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def rows(n: int, start: int = 0) -> list[dict]:
    png = encode_image(Image.new("RGB", (8, 8), (10, 20, 30)))
    return [{"key": f"{i:016x}", "status": "kept", "reason": None, "prompt": "p", "content_id": f"c{i}",
             "style_id": "s", "seed": i, "image": png, "meta": '{"operator": "x"}', "clip_content": 0.1,
             "clip_style": 0.2} for i in range(start, start + n)]


def commit(out: str, n: int, per_shard: int) -> OutputStore:
    """``n`` committed rows at ``out`` (layout prepared as a run would)."""
    store = OutputStore(out)
    store.prepare()
    commit_rows(store, rows(n), OutputConfig(path=out, samples_per_shard=per_shard))
    return store


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def user_folder(root: Path) -> Path:
    """A folder people care about: their own tar in shards/ and their README."""
    foreign_tar(root / "shards" / "mydata.tar")
    (root / "README.md").write_text("# my project\n\nnotes I do not want to lose\n")
    return root


# ---- 1. the marker --------------------------------------------------------------------------------------------
def test_run_refuses_a_folder_stylegen_did_not_make_and_touches_nothing(tmp_path):
    out = user_folder(tmp_path / "proj")
    before = snapshot(out)
    proc = stylegen("run", str(run_config(tmp_path / "run.yaml", str(tmp_path / "elsewhere"))), "-q",
                    "--set", f"output.path={out}")
    line = one_line(proc)
    assert proc.returncode == 2, proc.stderr
    assert str(out) in line and "README.md" in line and "shards" in line and MARKER in line, line
    assert snapshot(out) == before


def test_filter_and_verify_repair_refuse_a_foreign_folder(tmp_path):
    corpus = foreign_tar(tmp_path / "corpus" / "c-0.tar")
    out = user_folder(tmp_path / "proj")
    (out / "index").mkdir()
    (out / "index" / "notes.parquet").write_bytes(b"not ours")
    before = snapshot(out)
    proc = stylegen("filter", str(filter_config(tmp_path / "f.yaml", str(corpus), str(out))), "-q")
    assert proc.returncode == 2 and str(out) in one_line(proc), proc.stderr
    assert snapshot(out) == before
    proc = stylegen("verify", str(out), "--repair")
    assert proc.returncode == 2 and str(out) in one_line(proc), proc.stderr
    assert snapshot(out) == before


def test_a_copy_of_only_shards_is_refused(tmp_path):
    """A finished output's shards/ copied elsewhere: no marker, no index -- nothing may be taken for an orphan."""
    done = tmp_path / "done"
    claim(str(done), "run")
    commit(str(done), 6, 3)
    copy = tmp_path / "copy"
    (copy / "shards").mkdir(parents=True)
    for tar in (done / "shards").iterdir():
        (copy / "shards" / tar.name).write_bytes(tar.read_bytes())
    before = snapshot(copy)
    proc = stylegen("run", str(run_config(tmp_path / "run.yaml", str(copy))), "-q")
    assert proc.returncode == 2 and str(copy) in one_line(proc), proc.stderr
    assert snapshot(copy) == before


def test_new_and_legacy_outputs_get_the_marker(tmp_path):
    new = tmp_path / "new"
    assert check_owned(str(new)) == "new"
    claim(str(new), "filter")
    marker = json.loads((new / MARKER).read_text())
    assert marker["tool"] == "stylegen" and marker["kind"] == "filter" and marker["created"] and marker["version"]
    assert sorted(os.listdir(new)) == [MARKER]

    legacy = tmp_path / "legacy"  # written by a stylegen before the marker: its index says so
    commit(str(legacy), 3, 4)
    assert not (legacy / MARKER).exists()
    assert check_owned(str(legacy)) == "legacy"
    claim(str(legacy), "run")
    assert check_owned(str(legacy)) == "marked"

    run_json = tmp_path / "runjson"  # or its run.json
    run_json.mkdir()
    (run_json / "run.json").write_text(json.dumps({"config": {}, "operator_hash": "x", "versions": {}}))
    assert check_owned(str(run_json)) == "legacy"
    (run_json / "run.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(NotOurs):
        check_owned(str(run_json))


def test_s3_prefix_with_foreign_objects_is_refused_untouched(s3_env, tmp_path):
    fs, bucket = s3_env["fs"], s3_env["bucket"]
    fs.pipe_file(f"{bucket}/proj/shards/mydata.tar", foreign_tar(tmp_path / "m.tar").read_bytes())
    fs.pipe_file(f"{bucket}/proj/README.md", b"# mine\n")
    before = s3_snapshot(fs, bucket)
    out = f"s3://{bucket}/proj"
    proc = stylegen("run", str(run_config(tmp_path / "run.yaml", out)), "-q", env=s3_env["env"])
    assert proc.returncode == 2 and out in one_line(proc) and "README.md" in one_line(proc), proc.stderr
    assert s3_snapshot(fs, bucket) == before  # no marker, no write probe, nothing moved

    empty = f"s3://{bucket}/fresh"
    claim(empty, "run")
    assert json.loads(fs.cat_file(f"{bucket}/fresh/{MARKER}"))["tool"] == "stylegen"
    assert check_owned(empty) == "marked"


# ---- 2. never delete what stylegen did not write -----------------------------------------------------------
def test_orphan_shard_is_quarantined_not_deleted(tmp_path):
    from pipeline.output.integrity import open_output

    out = tmp_path / "out"
    claim(str(out), "run")
    store = commit(str(out), 4, 8)
    (committed,) = store.shard_files()
    orphan = foreign_tar(out / "shards" / "0123456789abcdef.tar")
    data = orphan.read_bytes()
    kept = Path(committed).read_bytes()

    counts = open_output(OutputStore(str(out)), None)
    assert counts["orphans_removed"] == 1
    moved = list((out / "_quarantine").glob("*/shards/0123456789abcdef.tar"))
    assert len(moved) == 1 and moved[0].read_bytes() == data
    assert Path(committed).read_bytes() == kept


def test_startup_stops_when_most_shards_would_be_quarantined(tmp_path):
    from pipeline.output.integrity import open_output

    out = tmp_path / "out"
    claim(str(out), "run")
    store = commit(str(out), 30, 2)
    assert len(store.shard_files()) == 15
    for index in (out / "index").iterdir():  # the index is lost: every shard looks like an orphan
        index.unlink()
    before = {k: v for k, v in snapshot(out).items() if v != "dir"}
    with pytest.raises(NotOurs, match="15 of 15 shards would be quarantined"):
        open_output(OutputStore(str(out)), None)
    assert {k: v for k, v in snapshot(out).items() if v != "dir"} == before
    assert not (out / "_quarantine").exists()


def test_card_never_replaces_a_readme_stylegen_did_not_write(tmp_path):
    from pipeline.output.card import write_card

    out = tmp_path / "out"
    claim(str(out), "run")
    (out / "README.md").write_text("my notes\n")
    write_card(OutputStore(str(out)), {"config": {}, "versions": {}})
    assert (out / "README.md").read_text() == "my notes\n"
    (out / "README.md").unlink()
    write_card(OutputStore(str(out)), {"config": {}, "versions": {}})
    card = (out / "README.md").read_text()
    write_card(OutputStore(str(out)), {"config": {}, "versions": {}, "finished_at": "now"})
    assert (out / "README.md").read_text() != card  # stylegen's own card is still updated


# ---- 3. no input under the output, no output inside a source ----------------------------------------------
def test_filter_inputs_under_the_output_are_a_config_error(tmp_path):
    c = tmp_path / "c"
    claim(str(c), "filter")
    for i in range(4):
        foreign_tar(c / "shards" / f"{i:05d}.tar")
    before = snapshot(c)
    proc = stylegen("filter", str(filter_config(tmp_path / "f.yaml", f"{c}/shards/{{00000..00003}}.tar", str(c))),
                    "-q")
    line = one_line(proc)
    assert proc.returncode == 2 and "input.shards" in line and "under output.path" in line, proc.stderr
    assert snapshot(c) == before


def test_output_inside_a_source_folder_is_a_config_error(tmp_path):
    content = tmp_path / "content"
    content.mkdir()
    for image in sorted((SAMPLES / "content").iterdir())[:2]:
        (content / image.name).write_bytes(image.read_bytes())
    before = snapshot(content)
    proc = stylegen("run", str(run_config(tmp_path / "run.yaml", str(content / "out"),
                                          content={"images": str(content)})), "-q")
    line = one_line(proc)
    assert proc.returncode == 2 and "output.path" in line and "content.images" in line, proc.stderr
    assert snapshot(content) == before


@pytest.mark.parametrize("output, spec, bad", [
    ("/data/c", "/data/c/shards/{00000..00003}.tar", True),  # brace pattern under the output
    ("/data/c", "/data/c/shards/00000.tar", True),  # a named file
    ("/data/c", "/data/c/captions.jsonl", True),  # a manifest
    ("/data/c", "/data/c/**/*.png", True),  # a glob
    ("/data/c/out", "/data/c/*.tar", False),  # the glob cannot reach into the output
    ("/data/c/out.tar", "/data/c/*.tar", True),  # the output itself matched by the glob
    ("/data/c/out", "/data/c", True),  # the output inside a source folder
    ("/data/c", "/data/{a,b}/x.tar", False),
    ("/data/out", "/data/in-*.tar", False),  # a glob that cannot reach into the output
    ("/data/c", "/data/*/x.tar", True),  # ... and one that can
    ("/data/out", "/data/**/x.tar", True),
    ("/data/cc", "/data/c/x.tar", False),  # a common prefix is not a parent
    ("s3://bkt/out", "s3://bkt/out/shards/{0..3}.tar", True),
    ("s3://bkt/out", "s3a://bkt/out/x/*.tar", True),
    ("s3://bkt/data/out", "s3://bkt/data/", True),
    ("s3://bkt/out", "s3://bkt/outside/x.tar", False),
    ("s3://bkt/out", "s3://other/out/x.tar", False),
    ("/data/c", "s3://data/c/x.tar", False),
    ("local:///data/c", "/data/c/shards/00000.tar", True),  # local:// is a local path, not a scheme of its own
    ("/data/c", "local:///data/c/x.tar", True),
    ("file:///data/c/out", "local:///data/c", True),
])
def test_overlap_of_every_kind_of_source(output, spec, bad):
    if bad:
        with pytest.raises(NotOurs):
            check_overlap(output, [("input.shards", spec)])
    else:
        check_overlap(output, [("input.shards", spec)])


def test_overlap_through_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    with pytest.raises(NotOurs):
        check_overlap(str(tmp_path / "real"), [("style.images", str(tmp_path / "alias" / "style"))])


# ---- 4. layout types ----------------------------------------------------------------------------------------
def test_layout_symlink_is_refused_never_followed(tmp_path):
    out = tmp_path / "out"
    claim(str(out), "run")
    elsewhere = tmp_path / "elsewhere"
    foreign_tar(elsewhere / "mydata.tar")
    (out / "shards").symlink_to(elsewhere)
    before, before_out = snapshot(elsewhere), snapshot(out)
    proc = stylegen("run", str(run_config(tmp_path / "run.yaml", str(out))), "-q")
    line = one_line(proc)
    assert proc.returncode == 2 and "shards" in line and "symlink" in line, proc.stderr
    assert snapshot(elsewhere) == before and snapshot(out) == before_out


def test_layout_file_where_a_folder_belongs_is_refused(tmp_path):
    out = tmp_path / "out"
    claim(str(out), "run")
    (out / "index").write_text("a file, not a folder")
    with pytest.raises(NotOurs, match="index is a file"):
        OutputStore(str(out)).prepare()
    assert (out / "index").read_text() == "a file, not a folder"


# ---- 5. the lease -------------------------------------------------------------------------------------------
def test_lease_symlink_target_is_never_written(tmp_path):
    from pipeline.output.lease import Lease, LeaseHeld

    out = tmp_path / "out"
    claim(str(out), "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / "_lease").symlink_to(victim)
    for take in (lambda: Lease(str(out)).acquire(), lambda: Lease(str(out)).check()):
        with pytest.raises(LeaseHeld, match="symlink"):
            take()
    assert victim.read_text() == "precious\n"
    proc = stylegen("run", str(run_config(tmp_path / "run.yaml", str(out))), "-q")
    assert proc.returncode == 2 and "_lease" in one_line(proc), proc.stderr
    assert victim.read_text() == "precious\n" and os.path.islink(out / "_lease")


def test_lease_fifo_is_refused_without_hanging(tmp_path):
    out = tmp_path / "out"
    claim(str(out), "run")
    os.mkfifo(out / "_lease")
    code = ("import sys; from pipeline.output.lease import Lease, LeaseHeld\n"
            "for step in ('check', 'acquire'):\n"
            "    try:\n"
            "        getattr(Lease(sys.argv[1]), step)()\n"
            "    except LeaseHeld as exc:\n"
            "        print(step, 'refused:', exc)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert time.monotonic() - start < 60
    assert proc.returncode == 0, proc.stderr
    assert "check refused" in proc.stdout and "acquire refused" in proc.stdout and "fifo" in proc.stdout
    proc = stylegen("run", str(run_config(tmp_path / "run.yaml", str(out))), "-q", timeout=120)
    assert proc.returncode == 2 and "_lease" in one_line(proc), proc.stderr


def test_s3_lease_expiry_is_judged_by_the_store_clock(s3_env, monkeypatch):
    """A taker whose clock runs an hour fast must not take a lease its holder renews."""
    import pipeline.output.lease as lease_mod
    from pipeline.output.lease import Lease, LeaseHeld

    out = f"s3://{s3_env['bucket']}/leased"
    holder = Lease(out, ttl_s=60).acquire()
    try:
        fast = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
        fast.time = lambda: time.time() + 3600  # only the lease module's clock: the store keeps real time
        monkeypatch.setattr(lease_mod, "time", fast)
        with pytest.raises(LeaseHeld, match="being written by"):
            Lease(out, ttl_s=60).acquire()
        with pytest.raises(LeaseHeld, match="being written by"):
            Lease(out, ttl_s=60).check()
        monkeypatch.setattr(lease_mod, "time", time)
    finally:
        holder.release()


def test_precondition_failed_is_recognised_by_code_not_text():
    from botocore.exceptions import ClientError

    from pipeline.output.lease import precondition_failed

    refused = ClientError({"Error": {"Code": "PreconditionFailed", "Message": "At least one of the pre-conditions"},
                           "ResponseMetadata": {"HTTPStatusCode": 412}}, "PutObject")
    wrapped = OSError(5, "whatever")
    wrapped.__cause__ = refused
    assert precondition_failed(refused) and precondition_failed(wrapped)
    assert not precondition_failed(OSError(5, "upload of part 412 failed: PreconditionFailed in the text"))


# ---- 6. transient is not damaged --------------------------------------------------------------------------
@pytest.fixture
def s3_output(s3_env, monkeypatch):
    """A committed output on moto S3, then this process pointed at a proxy in front of it."""
    import s3fs

    out = f"s3://{s3_env['bucket']}/flaky"
    claim(out, "run")
    commit(out, 4, 2)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: each 503 reaches stylegen
    # These tests point this process at a per-test proxy (and take credentials away) through its environment.
    # The session's Ray workers (ray_local, when an earlier test started it) keep the environment they were
    # started with, so the start-up checks run in this process here, as they do when no Ray is initialised.
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    s3fs.S3FileSystem.clear_instance_cache()
    yield out, s3_env
    s3fs.S3FileSystem.clear_instance_cache()


def _through(proxy: FlakyProxy, monkeypatch) -> None:
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_transient_503_at_startup_quarantines_nothing(s3_output, monkeypatch):
    """Two 503s on an index file are retried; only content damage (bad magic, even 503 bytes of it) quarantines."""
    from pipeline.output.integrity import open_output

    out, env = s3_output
    fs, bucket = env["fs"], env["bucket"]
    damaged = f"{bucket}/flaky/index/ffffffffffffffff.parquet"
    fs.pipe_file(damaged, b"x" * 503)
    before = s3_snapshot(fs, bucket)
    with FlakyProxy(env["env"]["AWS_ENDPOINT_URL"], "/index/", fail=2) as proxy:
        _through(proxy, monkeypatch)
        counts = open_output(OutputStore(out), None)
    assert proxy.failed == 2
    assert counts == {"orphans_removed": 0, "repaired": 1, "retried": 0}
    after = s3_snapshot(fs, bucket)
    moved = [p for p in after if "/_quarantine/" in p]
    assert len(moved) == 1 and moved[0].endswith("/index/ffffffffffffffff.parquet")
    assert {p: d for p, d in after.items() if p not in moved} == {p: d for p, d in before.items() if p != damaged}


def test_a_persistent_503_stops_startup_and_moves_nothing(s3_output, monkeypatch):
    from pipeline.output.integrity import open_output

    out, env = s3_output
    before = s3_snapshot(env["fs"], env["bucket"])
    with FlakyProxy(env["env"]["AWS_ENDPOINT_URL"], "/index/", fail=10_000) as proxy:
        _through(proxy, monkeypatch)
        with pytest.raises(StoreUnavailable, match="nothing was changed") as err:
            open_output(OutputStore(out), None)
    assert "\n" not in str(err.value) and proxy.failed >= 2
    assert s3_snapshot(env["fs"], env["bucket"]) == before


def test_missing_credentials_at_startup_move_nothing(s3_output, monkeypatch, tmp_path):
    """A store that refuses every read (no credentials) is not damage: one line, and every file stays put."""
    import s3fs

    from pipeline.output.integrity import open_output

    out, env = s3_output
    before = s3_snapshot(env["fs"], env["bucket"])
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    missing = str(tmp_path / "no-such-aws-file")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", missing)
    monkeypatch.setenv("AWS_CONFIG_FILE", missing)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup from a test
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StoreUnavailable, match="refused .*nothing was changed") as err:
        open_output(OutputStore(out), None)
    assert "\n" not in str(err.value)
    assert s3_snapshot(env["fs"], env["bucket"]) == before


def test_a_store_failing_shard_reads_is_not_a_damaged_shard(s3_output, monkeypatch):
    """The deep check reads every shard: a store that fails those reads stops it; no shard is called damaged."""
    from pipeline.output.integrity import check

    out, env = s3_output
    with FlakyProxy(env["env"]["AWS_ENDPOINT_URL"], "/shards/", fail=10_000) as proxy:
        _through(proxy, monkeypatch)
        with pytest.raises(StoreUnavailable, match="did not answer"):
            check(OutputStore(out), deep=True)
    assert proxy.failed >= 2
    _through(types.SimpleNamespace(url=env["env"]["AWS_ENDPOINT_URL"]), monkeypatch)
    assert check(OutputStore(out), deep=True) == []  # the same output, read through a healthy store, is sound


def test_verify_repair_through_a_failing_store_is_one_line_and_moves_nothing(s3_output):
    out, env = s3_output
    before = s3_snapshot(env["fs"], env["bucket"])
    with FlakyProxy(env["env"]["AWS_ENDPOINT_URL"], "/index/", fail=10_000) as proxy:
        proc = stylegen("verify", out, "--repair", env={"AWS_ENDPOINT_URL": proxy.url, "AWS_MAX_ATTEMPTS": "1"},
                        timeout=180)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]  # retries log warnings
    assert proc.returncode == 1 and len(errors) == 1 and "did not answer" in errors[0], proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert proxy.failed >= 2
    assert s3_snapshot(env["fs"], env["bucket"]) == before


def test_validate_reports_a_source_under_the_output(tmp_path):
    out = tmp_path / "out"
    styles = out / "styles"
    styles.mkdir(parents=True)
    (styles / "a.png").write_bytes(encode_image(Image.new("RGB", (8, 8), (1, 2, 3))))
    proc = stylegen("validate", str(run_config(tmp_path / "run.yaml", str(out), style={"images": str(styles)})))
    line = one_line(proc)
    assert proc.returncode == 2 and "style.images" in line and "under output.path" in line, proc.stderr
