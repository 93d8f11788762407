"""Foreign tars are data, never names (issue 26): output member names are always ``<16 hex>.<ext>``, a
foreign sample's ``__key__``/``__url__`` members, unsafe or over-long extensions and unscreened images never
reach an output, one caption reader serves ``run`` and ``filter`` (a deep, huge or control-character caption costs
the caption, never the tar or the run), ``filter`` decodes under ``run``'s guards, and ``stylegen verify`` reports
unsafe member names and members not grouped by key."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import FilterRunConfig, validate_config
from pipeline.filter.inputs import caption
from pipeline.filter.run import curate
from pipeline.io.sources import read_images
from pipeline.io.tar_index import index_tar
from pipeline.output.tars import write_tar
from pipeline.schema import INDEX_SCHEMA
from tests.hostile_corpus import encoded, textured
from tests.invariants import check_invariants, read_index

REPO = Path(__file__).resolve().parents[1]
OUTPUT_NAME = re.compile(r"^[0-9a-f]{16}\.(jpg|png|txt|json|cls)$")
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000  # json.loads: RecursionError
LONG_EXT = "x" * 120


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these members, in this order (PAX, so long names are allowed)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _jpg(seed: int, size: tuple[int, int] = (48, 48)) -> bytes:
    return encoded(textured(size, seed=seed), "JPEG", quality=90)


def _output_members(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of every shard, asserting each name is ``<16 hex>.<ext>`` and a regular file."""
    got: dict[str, dict[str, bytes]] = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                assert OUTPUT_NAME.match(m.name) and m.isfile(), m.name
                key, ext = m.name.split(".", 1)
                got.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return got


def _verify(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", "verify", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


# ---- filter: foreign names never reach the writer -----------------------------------------------------------
@pytest.mark.slow
def test_filter_writes_only_its_own_names_and_the_screened_image(ray_local, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    evil_png = encoded(textured((40, 40), seed=99), "PNG")
    _tar(corpus / "in.tar", [
        ("good.jpg", _jpg(1)), ("good.txt", b"a red square"), ("good.json", b'{"caption": "a red square"}'),
        ("good.cls", b"3"),
        # the __key__ member's content is a traversal; __url__ is reserved; the png is a second, unscreened image
        ("evil.jpg", _jpg(2)), ("evil.txt", b"evil"), ("evil.__key__", b"x/../../../tmp/p"),
        ("evil.__url__", b"http://127.0.0.1:9/x"), ("evil.png", evil_png),
        ("long.jpg", _jpg(3)), ("long.txt", b"long"), (f"long.{LONG_EXT}", b"payload"),
        ("deep.jpg", _jpg(4)), ("deep.json", DEEP_JSON),
        ("sliver.jpg", _jpg(5, (400, 8))), ("sliver.txt", b"a sliver"),  # aspect 50 > decode.max_aspect 20
        ("html.jpg", b"<!DOCTYPE html><html><body>not found</body></html>"), ("html.txt", b"html"),
        ("plain.jpg", _jpg(6)), ("plain.txt", b"plain \x1b[31mred\x07"),
        # over decode.max_bytes: the screened image (trailing bytes a decoder would ignore), a kept text member
        ("bigimg.jpg", _jpg(7) + bytes(400_000)), ("bigimg.txt", b"big image"),
        ("bigtxt.jpg", _jpg(8)), ("bigtxt.txt", b"x" * 400_000),
    ])
    out = tmp_path / "out"
    cfg = validate_config({"input": {"shards": str(corpus / "in.tar")}, "output": {"path": str(out)},
                           "decode": {"max_bytes": 300_000},
                           "scoring": {"clip_model": "tiny:clip", "batch_size": 8}}, schema=FilterRunConfig)
    summary = curate(cfg, quiet=True)
    assert (summary.planned, summary.kept, summary.failed) == (9, 5, 4), summary

    rows = check_invariants(str(out), {hashlib.sha1(f"in.tar/{k}".encode()).hexdigest()[:16]
                                       for k in ("good", "evil", "long", "deep", "sliver", "html", "plain",
                                                                    "bigimg", "bigtxt")})
    by_id = {r["content_id"].split("/", 1)[1]: r for r in rows}
    for r in rows:  # the key derivation of every existing filter output: sha1 of the source id
        assert r["key"] == hashlib.sha1(r["content_id"].encode()).hexdigest()[:16]
    assert "aspect ratio" in by_id["sliver"]["reason"] and "max_aspect" in by_id["sliver"]["reason"]
    assert by_id["html"]["reason"] == "image: not an image: HTML document"
    assert all(" at 0x" not in (r["reason"] or "") for r in rows)
    for name, ext in (("bigimg", "jpg"), ("bigtxt", "txt")):  # refused from the tar index, never read whole
        assert by_id[name]["reason"].startswith(f"member .{ext}: ") and "decode.max_bytes=300000" in \
            by_id[name]["reason"], by_id[name]["reason"]

    members = _output_members(out)
    assert set(members[by_id["good"]["key"]]) == {"jpg", "txt", "json", "cls"}
    assert "dropped" not in json.loads(by_id["good"]["meta"])
    assert members[by_id["evil"]["key"]] == {"jpg": _jpg(2), "txt": b"evil"}
    assert json.loads(by_id["evil"]["meta"])["dropped"] == ["__key__", "__url__", "png"]
    assert set(members[by_id["long"]["key"]]) == {"jpg", "txt"}
    dropped = json.loads(by_id["long"]["meta"])["dropped"]
    assert len(dropped) == 1 and dropped[0].startswith("xxx") and len(dropped[0]) <= 64
    assert by_id["deep"]["status"] == "kept" and by_id["deep"]["prompt"] is None  # the caption only is lost
    assert by_id["plain"]["prompt"] == "plain [31mred"  # control characters stripped, as in `run`
    assert not any(p.name == "p" for p in tmp_path.rglob("*")) and not Path("/tmp/p").exists()

    assert curate(cfg, quiet=True).skipped == 9  # a rerun succeeds and has nothing to do
    assert len(read_index(str(out))) == 9
    proc = _verify(out)
    assert proc.returncode == 0 and "ok: 0 problems" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
def test_run_on_a_foreign_tar_loses_at_most_a_caption(ray_local, tmp_path):
    from pipeline.generate.run import run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _tar(corpus / "in.tar", [
        ("good.jpg", _jpg(1)), ("good.txt", b"a good \x1b[0msample"),
        ("deep.jpg", _jpg(2)), ("deep.json", DEEP_JSON),
        ("long.jpg", _jpg(3)), ("long.txt", b"long"), (f"long.{LONG_EXT}", b"payload"),
        ("evil.jpg", _jpg(4)), ("evil.__key__", b"x/../../../tmp/p"), ("evil.txt", b"evil"),
    ])
    (tmp_path / "style").mkdir()
    (tmp_path / "style" / "s.png").write_bytes(encoded(textured((32, 32), seed=7), "PNG"))
    out = tmp_path / "out"
    cfg = validate_config({
        "output": {"path": str(out), "samples_per_shard": 8}, "content": {"images": str(corpus / "in.tar")},
        "style": {"images": str(tmp_path / "style")}, "decode": {"max_side": 64},
        "operator": {"name": "color-transfer"}, "scoring": {"clip_model": "tiny:clip", "batch_size": 8}})
    summary = run(cfg, quiet=True)
    assert (summary.planned, summary.kept, summary.failed) == (4, 4, 0), summary  # the whole tar is used
    prompts = {r["content_id"]: r["prompt"] for r in read_index(str(out))}
    assert prompts == {"in.tar/good": "a good [0msample", "in.tar/deep": None, "in.tar/long": "long",
                       "in.tar/evil": "evil"}
    assert len(_output_members(out)) == 4  # every name <16 hex>.<ext>
    assert not any(p.name == "p" for p in tmp_path.rglob("*"))


# ---- one caption reader ---------------------------------------------------------------------------------------
def test_run_and_filter_read_captions_with_one_reader(tmp_path, caplog):
    path = _tar(tmp_path / "caps.tar", [
        ("ctl.jpg", _jpg(1)), ("ctl.txt", b"a\x00b\x1bc caption\x07 "),
        ("jsn.jpg", _jpg(2)), ("jsn.json", json.dumps({"caption": " x\x01y "}).encode()),
        ("deep.jpg", _jpg(3)), ("deep.json", DEEP_JSON),
        ("deepobj.jpg", _jpg(4)), ("deepobj.json", b'{"caption": ' + DEEP_JSON + b"}"),
        ("huge.jpg", _jpg(5)), ("huge.txt", b"word " * 6_000),  # 30 000 characters > MAX_PROMPT_CHARS
        ("bad.jpg", _jpg(6)), ("bad.txt", b"\xff\xfe not utf-8"), ("bad.json", b"{not json"),
        ("fallback.jpg", _jpg(7)), ("fallback.txt", b"\x01\x02"), ("fallback.json", b'{"text": "from json"}'),
    ])
    want = {"ctl": "abc caption", "jsn": "xy", "deep": None, "deepobj": None, "huge": None, "bad": None,
            "fallback": "from json"}
    with caplog.at_level("WARNING", logger="pipeline"):
        items = read_images(str(path), "content.images")  # `run`: the whole tar is read, no sample lost
    assert {i.id.split("/", 1)[1]: i.prompt for i in items} == want
    assert all(i.error is None for i in items)
    assert "deep.json (RecursionError" in caplog.text and "huge.txt (ValueError: prompt too long" in caplog.text
    index = index_tar(str(path))  # `filter`: the same captions
    assert {s.key: caption(str(path), s.members) for s in index.samples} == want


# ---- the writer and verify --------------------------------------------------------------------------------------
KEY = "0123456789abcdef"


@pytest.mark.parametrize("key, ext", [("x/../../../tmp/p", "jpg"), (KEY, "__url__"), (KEY, "_x"),
                                      (KEY, LONG_EXT), (KEY, "JPG"), (KEY, "a/b"), ("short", "jpg")])
def test_write_tar_refuses_foreign_member_names(key, ext):
    with pytest.raises(ValueError, match="refusing to write tar member"):
        write_tar(io.BytesIO(), [{"__key__": key, ext: b"data"}])


def _hand_made_output(out: Path, members: list[tuple[str, bytes]]) -> None:
    """An output whose one shard holds exactly ``members`` and whose index keeps their keys, sizes consistent
    (as an older stylegen, or another tool, could have written it)."""
    (out / "shards").mkdir(parents=True)
    (out / "index").mkdir()
    shard = _tar(out / "shards" / "aaaaaaaaaaaaaaaa.tar", members)
    keys = sorted({name.partition(".")[0] for name, _ in members})
    rows = [{name: None for name in INDEX_SCHEMA.names} | {"key": k, "status": "kept", "shard": shard.name,
                                                          "shard_size": shard.stat().st_size} for k in keys]
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), out / "index" / "aaaaaaaaaaaaaaaa.parquet")


K1, K2 = "1111111111111111", "2222222222222222"


@pytest.mark.parametrize("members, needle", [
    ([(f"{K1}.jpg", b"1"), (f"{K1}.__key__", b"x/../p")], "unsafe member name '1111111111111111.__key__'"),
    ([(f"{K1}.jpg", b"1"), (f"{K1}.{LONG_EXT}", b"2")], "unsafe member name '1111111111111111.xxx"),
    ([(f"{K1}.jpg", b"1"), (f"{K1}.Txt", b"2")], "unsafe member name '1111111111111111.Txt'"),
    ([(f"{K1}.jpg", b"1"), (f"{K2}.jpg", b"2"), (f"{K1}.txt", b"3")], "members not grouped by key: " + K1),
])
def test_verify_reports_unsafe_member_names_and_ungrouped_members(tmp_path, members, needle):
    out = tmp_path / "out"
    _hand_made_output(out, members)
    proc = _verify(out)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert needle in proc.stdout and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
