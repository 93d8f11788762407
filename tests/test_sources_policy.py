"""Sources reach only what the user named (issue 26): a protocol allow-list, manifest entries kept inside the
manifest's own root, devices refused under every spelling, and byte caps checked from the size before reading.

Requests are counted by a real HTTP server on 127.0.0.1 (it stands in for the cloud metadata endpoint too); every
call that could hang or read forever on a regression runs bounded in time (``bounded`` or a subprocess timeout);
an 8 GB input is a sparse file, so a regression that reads it fails on time, not on disk space.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import ConfigError, validate_config
from pipeline.generate.stages import decode_batch, to_table
from pipeline.io.fs import InputTooLargeError, read_range
from pipeline.io.sources import SourceError, read_images, read_prompts
from tests.hostile_corpus import textured
from tests.http_counter import CountingServer
from tests.test_hostile_runs import assert_one_line_error, stylegen
from tests.test_input_safety import bounded, fifo, sock
from tests.unit_helpers import solid_png

HUGE = 8 * 2**30  # an "8 GB" input: a sparse file, never written


@pytest.fixture
def http_server():
    with CountingServer() as server:
        yield server.url, server.requests


def sparse(path: Path, size: int = HUGE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def hostile_manifest(folder: Path, http: str, bucket: str = "someone-elses-bucket") -> tuple[Path, dict[str, str]]:
    """A jsonl manifest ``folder/m.jsonl`` whose rows name one good image inside the folder and everything a
    manifest from the internet may name outside it; returns the path and id -> expected reason (None = kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    textured((40, 40), seed=1).save(folder / "good.png")
    textured((40, 40), seed=2).save(folder.parent / "private.png")  # a real image, just not the manifest's
    os.symlink(folder.parent / "private.png", folder / "link.png")
    os.symlink("/dev/zero", folder / "zero.png")
    rows = {
        "good": ("good.png", None),
        "etc": ("/etc/passwd", "outside the manifest's folder"),
        "climb": ("../private.png", "outside the manifest's folder"),
        "link-out": ("link.png", "outside the manifest's folder"),
        "dev-local": ("local:///dev/zero", "outside the manifest's folder"),
        "dev-file": ("file:///dev/zero", "outside the manifest's folder"),
        "dev-link": ("zero.png", "outside the manifest's folder"),
        "metadata": (f"{http}/latest/meta-data/iam/security-credentials/", "protocol 'http' is not allowed"),
        "chained": (f"zip://good.png::{http}/x.zip", "chained URL refused"),
        "memory": ("memory://good.png", "protocol 'memory' is not allowed"),
        "bucket": (f"s3://{bucket}/x.png", "outside the manifest's folder"),
    }
    path = folder / "m.jsonl"
    path.write_text("".join(json.dumps({"id": i, "image": img, "prompt": "a photo"}) + "\n"
                            for i, (img, _) in rows.items()))
    return path, {i: reason for i, (_, reason) in rows.items()}


# ---- 1. the protocol allow-list ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["{http}/styles/", "{http}/style.png", "memory://styles/", "gs://bucket/styles/",
                                  "zip://style.png::{http}/a.zip", "simplecache::{http}/a.png",
                                  "/tmp/{{a,b}}::{http}/x.png"])
def test_a_source_with_a_refused_protocol_is_a_source_error_and_no_request(http_server, spec):
    base, requests = http_server
    spec = spec.format(http=base)
    with pytest.raises(SourceError) as err:
        bounded(lambda: read_images(spec, "style.images"))
    assert str(err.value).startswith("style.images: ")
    assert "not allowed" in str(err.value) or "chained URL refused" in str(err.value)
    assert requests == []


def test_a_refused_prompt_list_protocol_is_a_source_error_and_no_request(http_server):
    base, requests = http_server
    with pytest.raises(SourceError, match=r"^content.prompts: protocol 'http' is not allowed"):
        bounded(lambda: read_prompts(f"{base}/prompts.txt"))
    assert requests == []


def test_protocols_are_validated_and_local_is_file():
    base = {"output": {"path": "/tmp/o"}, "content": {"prompts": "p.txt"}, "style": {"images": "s/"}}
    assert validate_config(base).sources.protocols == ["file", "s3"]
    cfg = validate_config({**base, "sources": {"protocols": ["local", "S3", "https"]}})
    assert cfg.sources.protocols == ["file", "s3", "https"]
    for bad in (["memory"], [], ["zip::s3"]):
        with pytest.raises(ConfigError, match="sources.protocols"):
            validate_config({**base, "sources": {"protocols": bad}})


def test_an_allowed_protocol_is_read(http_server, tmp_path):
    """Allowing ``http`` is possible and then works: the allow-list refuses by config, not by accident."""
    base, requests = http_server
    cfg = validate_config({"output": {"path": str(tmp_path / "o")}, "content": {"prompts": "p.txt"},
                           "style": {"images": f"{base}/style.png"}, "sources": {"protocols": ["file", "http"]}})
    items = bounded(lambda: read_images(f"{base}/style.png", "style.images", policy=cfg.sources))
    assert [i.image.url for i in items] == [f"{base}/style.png"] and requests


def test_cli_run_with_an_http_style_source_exits_2_with_one_line_and_no_request(http_server, tmp_path):
    base, requests = http_server
    proc = stylegen("run", "configs/demo.yaml", "--set", f"style.images={base}/latest/meta-data/",
                    "--set", f"output.path={tmp_path / 'out'}", timeout=120)
    assert_one_line_error(proc, "style.images", "protocol 'http' is not allowed")
    assert requests == [] and not (tmp_path / "out").exists()


# ---- 2. manifest entries stay inside the manifest's root -----------------------------------------------------


def test_manifest_entries_outside_its_folder_fail_their_row_without_a_request(http_server, tmp_path):
    base, requests = http_server
    path, expect = hostile_manifest(tmp_path / "corpus", base)
    items = {i.id: i for i in bounded(lambda: read_images(str(path), "content.images"))}
    assert set(items) == set(expect)
    for item_id, reason in expect.items():
        item = items[item_id]
        if reason is None:
            assert item.error is None and item.image.url == str(tmp_path / "corpus" / "good.png")
        else:
            assert item.image is None and reason in item.error, (item_id, item.error)
    assert requests == []


def test_sources_roots_widen_where_manifest_entries_may_point(tmp_path):
    path, _ = hostile_manifest(tmp_path / "corpus", "http://127.0.0.1:9")
    cfg = validate_config({"output": {"path": str(tmp_path / "o")}, "content": {"images": str(path)},
                           "style": {"images": str(tmp_path)}, "sources": {"roots": [str(tmp_path)]}})
    items = {i.id: i for i in read_images(str(path), "content.images", policy=cfg.sources)}
    assert items["climb"].error is None and items["link-out"].error is None  # inside the widened root now
    assert "outside" in items["etc"].error and "outside" in items["dev-local"].error  # still not /etc, /dev


@pytest.mark.s3
def test_an_s3_manifest_reaches_only_its_own_prefix(s3_env):
    fs, bucket = s3_env["fs"], s3_env["bucket"]
    png = solid_png((1, 2, 3))
    for name in ("corpus/img/a.png", "other/b.png"):
        fs.pipe_file(f"{bucket}/{name}", png)
    rows = [{"id": "in", "image": "img/a.png"}, {"id": "sibling", "image": "../other/b.png"},
            {"id": "bucket", "image": f"s3://{bucket}-other/a.png"}, {"id": "abs", "image": "/etc/passwd"},
            {"id": "local", "image": "file:///etc/passwd"}]
    fs.pipe_file(f"{bucket}/corpus/m.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    items = {i.id: i for i in read_images(f"s3://{bucket}/corpus/m.jsonl", "content.images")}
    assert items["in"].error is None and items["in"].image.url == f"s3://{bucket}/corpus/img/a.png"
    for name in ("sibling", "bucket", "abs", "local"):
        assert items[name].image is None and "outside the manifest's folder" in items[name].error, items[name]


# ---- 3. devices, FIFOs, sockets under every spelling ---------------------------------------------------------


def test_devices_fifos_and_sockets_fail_their_row_under_every_spelling(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.png")
    pipe = fifo(tmp_path / "pipe.png")
    short = Path(tempfile.mkdtemp(dir="/tmp"))  # AF_UNIX paths are short
    listening = sock(short / "s.png")
    urls = ["/dev/zero", "file:///dev/zero", "local:///dev/zero", str(tmp_path / "zero.png"),
            f"local://{tmp_path / 'zero.png'}", f"local://{pipe}", f"file://{pipe}", f"local://{short / 's.png'}"]
    rows = [{"key": f"{i:016x}", "status": "", "style_url": url, "style_offset": 0, "style_size": -1,
             "content_url": None} for i, url in enumerate(urls)]
    try:
        out = bounded(lambda: decode_batch(to_table(rows), {"max_side": 64}).to_pylist(), fifos=[pipe])
    finally:
        listening.close()
        shutil.rmtree(short)
    for url, row in zip(urls, out, strict=True):
        assert row["status"] == "failed" and "not a regular file" in row["reason"], (url, row["reason"])


def test_read_range_refuses_local_url_devices_without_reading(tmp_path):
    for url in ("local:///dev/zero", "local:///dev/urandom"):
        with pytest.raises(OSError, match="not a regular file"):
            bounded(lambda url=url: read_range(url))


# ---- 4. byte caps --------------------------------------------------------------------------------------------


def test_read_range_refuses_a_huge_file_from_its_size(tmp_path):
    huge = sparse(tmp_path / "huge.png")
    with pytest.raises(InputTooLargeError, match=rf"too large: {HUGE} bytes, more than decode.max_bytes=1024"):
        bounded(lambda: read_range(str(huge), max_bytes=1024), limit_s=5)
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1024)
    assert read_range(str(small), max_bytes=1024) == b"x" * 1024  # the cap itself is allowed
    with pytest.raises(InputTooLargeError):  # a tar member is refused from its recorded size: nothing read
        read_range(str(huge), offset=512, size=2048, max_bytes=1024)


@pytest.mark.s3
def test_read_range_caps_s3_objects_from_their_size(s3_env):
    fs, bucket = s3_env["fs"], s3_env["bucket"]
    fs.pipe_file(f"{bucket}/big.bin", b"y" * 4096)
    fs.pipe_file(f"{bucket}/ok.bin", b"z" * 1000)
    fs.pipe_file(f"{bucket}/empty.bin", b"")
    with pytest.raises(InputTooLargeError, match="4096 bytes, more than decode.max_bytes=1024"):
        read_range(f"s3://{bucket}/big.bin", max_bytes=1024)
    assert read_range(f"s3://{bucket}/ok.bin", max_bytes=1024) == b"z" * 1000
    assert read_range(f"s3://{bucket}/empty.bin", max_bytes=1024) == b""


def test_decode_max_bytes_is_checked_and_keeps_the_keys():
    base = {"output": {"path": "/tmp/o"}, "content": {"prompts": "p.txt"}, "style": {"images": "s/"}}
    default = validate_config(base)
    assert default.decode.max_bytes == 64 * 2**20
    assert validate_config({**base, "decode": {"max_bytes": 2**20}}).operator_hash() == default.operator_hash()
    with pytest.raises(ConfigError, match="decode.max_bytes"):
        validate_config({**base, "decode": {"max_bytes": 0}})


def test_prompt_lists_are_capped_in_bytes_and_lines(tmp_path):
    cfg = validate_config({"output": {"path": str(tmp_path / "o")}, "content": {"prompts": "p.txt"},
                           "style": {"images": "s/"}, "sources": {"max_prompt_lines": 3}})
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    assert [p.prompt for p in read_prompts(str(tmp_path / "three.txt"), policy=cfg.sources)] == ["a", "b", "c"]
    (tmp_path / "four.txt").write_text("a\nb\nc\nd")
    with pytest.raises(SourceError, match=r"^content.prompts: .*four.txt has more than sources.max_prompt_lines=3"):
        read_prompts(str(tmp_path / "four.txt"), policy=cfg.sources)
    (tmp_path / "four.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in "abcd"))
    with pytest.raises(SourceError, match="sources.max_prompt_lines=3"):
        read_prompts(str(tmp_path / "four.jsonl"), policy=cfg.sources)
    huge = sparse(tmp_path / "huge.txt")
    with pytest.raises(SourceError, match=rf"^content.prompts: too large: {HUGE} bytes, more than "
                                          rf"sources.max_prompt_bytes={64 * 2**20}"):
        bounded(lambda: read_prompts(str(huge)), limit_s=5)


@pytest.mark.parametrize("name", ["huge.jsonl", "huge.parquet"])
def test_manifests_are_capped_in_bytes(tmp_path, name):
    huge = sparse(tmp_path / name)
    with pytest.raises(SourceError, match=rf"^style.images: too large: {HUGE} bytes, more than "
                                          rf"sources.max_manifest_bytes={256 * 2**20}"):
        bounded(lambda: read_images(str(huge), "style.images"), limit_s=5)


def test_cli_validate_refuses_a_huge_prompt_list_with_one_line(tmp_path):
    huge = sparse(tmp_path / "prompts.txt")
    proc = stylegen("validate", "configs/demo.yaml", "--set", f"content.prompts={huge}", "--set", "content.images=",
                    "--set", f"output.path={tmp_path / 'out'}", timeout=120)
    assert_one_line_error(proc, "content.prompts", "sources.max_prompt_bytes")


# ---- a whole run: hostile manifest and an 8 GB style ---------------------------------------------------------


@pytest.mark.slow
def test_cli_run_fails_each_refused_entry_and_the_huge_style_alone(http_server, tmp_path):
    """A real CLI run (embedded Ray) on a manifest from the internet and a style folder holding an 8 GB file:
    it finishes in bounded time, every refused row is `failed` with its reason, the huge style fails its own
    samples from its size, the good pairs are kept, and the HTTP server saw no request, nor after the index is
    edited to point at it and the output is reported and reproduced."""
    base, requests = http_server
    manifest, expect = hostile_manifest(tmp_path / "corpus", base)
    style = tmp_path / "style"
    style.mkdir()
    textured((32, 32), seed=10).save(style / "good.png")
    sparse(style / "huge.png")
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "output": {"path": str(out), "samples_per_shard": 8},
        "content": {"images": str(manifest)},
        "style": {"images": str(style)},
        "pairing": {"styles_per_content": 2},
        "decode": {"max_side": 64},
        "operator": {"name": "color-transfer", "batch_size": 4},
        "scoring": {"clip_model": "tiny:clip", "batch_size": 8},
    }))
    proc = stylegen("run", str(config), "--quiet", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pa.concat_tables([pq.read_table(p) for p in sorted((out / "index").glob("*.parquet"))]).to_pylist()
    assert len(rows) == 2 * len(expect)
    for row in rows:
        reason = expect[row["content_id"]]
        if reason is not None:
            assert row["status"] == "failed" and reason in row["reason"], row
        elif row["style_id"] == "huge.png":
            assert row["status"] == "failed" and f"too large: {HUGE} bytes" in row["reason"], row
        else:
            assert row["status"] == "kept", row
    assert requests == []

    # An edited index is data too: report and reproduce re-read inputs only under the run's allow-list.
    metadata = f"{base}/latest/meta-data/iam/security-credentials/"
    kept = next(r["key"] for r in rows if r["status"] == "kept")
    for path in (out / "index").glob("*.parquet"):
        table = pq.read_table(path)
        urls = pa.array([metadata if u else u for u in table.column("content_url").to_pylist()], pa.string())
        pq.write_table(table.set_column(table.schema.get_field_index("content_url"), "content_url", urls), path)
    report = stylegen("report", str(out), "--out", str(tmp_path / "report"), timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    reproduce = stylegen("reproduce", str(out), kept, timeout=300)
    assert_one_line_error(reproduce, "content input refused", "protocol 'http' is not allowed")
    assert requests == []


def test_filter_input_shards_obey_the_allow_list(http_server, tmp_path):
    from pipeline.filter.inputs import list_inputs

    base, requests = http_server
    data = {"kind": "filter", "input": {"shards": f"{base}/shards/{{00000..00003}}.tar"},
            "output": {"path": str(tmp_path / "out")}}
    with pytest.raises(SourceError, match=r"^input.shards: protocol 'http' is not allowed"):
        bounded(lambda: list_inputs(validate_config(dict(data), schema="auto")))
    allowed = validate_config({**data, "sources": {"protocols": ["http"]}}, schema="auto")
    assert len(list_inputs(allowed)) == 4  # named by the config: listed (brace patterns name files, no request)
    assert requests == []
