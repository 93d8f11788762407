"""Inputs that could hang or mislead a run (docs/architecture.md §7): FIFOs, sockets and devices among the inputs,
symlinks out of a corpus, the run's own output inside a source folder, flaky and slow remote stores.

Every test that could hang on a regression runs its call through :func:`bounded`, so a regression fails
after a few seconds instead of blocking the test session; a reader stuck on a FIFO is released afterwards.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.config import validate_config
from pipeline.generate.stages import decode_batch, to_table
from pipeline.io import fs as pfs
from pipeline.io.fs import NotRegularFileError, is_transient, read_range, retry_transient, storage_options
from pipeline.io.sources import SourceError, read_content, read_images, read_prompts
from pipeline.io.tar_index import index_tar
from pipeline.plan.keys import build_plan
from tests.unit_helpers import solid_png, wds_tar

LIMIT_S = 20


def _release(fifos: Sequence[Path]) -> None:
    """Unblock a reader stuck in open() or read() on a FIFO (only happens on a regression)."""
    for fifo in fifos:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader waiting: nothing to release


def bounded(fn, *, fifos: Sequence[Path] = (), limit_s: float = LIMIT_S):
    """``fn()`` in a thread; fails the test if it has not returned within ``limit_s``, re-raises its error."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    if thread.is_alive():
        for _ in range(50):
            _release(fifos)
            thread.join(0.1)
        pytest.fail(f"call did not return within {limit_s}s (blocked on a non-regular file?)")
    if "error" in result:
        raise result["error"]
    return result["value"]


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def sock(path: Path) -> socket.socket | None:
    """A listening unix socket at ``path``, or None when the path is too long for AF_UNIX."""
    if len(os.fsencode(path)) >= 100:
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    return s


@pytest.fixture
def styles(tmp_path) -> Path:
    folder = tmp_path / "styles"
    folder.mkdir()
    (folder / "a.png").write_bytes(solid_png((200, 10, 10)))
    (folder / "b.png").write_bytes(solid_png((10, 200, 10)))
    return folder


def skipped_lines(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and name in r.getMessage()]


# ---- 1. only regular files are listed ----------------------------------------------------------------------


def test_folder_listing_skips_fifo_and_socket_with_one_warning_each(styles, caplog):
    pipe = fifo(styles / "pipe.png")
    server = sock(styles / "s.png")
    try:
        with caplog.at_level(logging.WARNING):
            items = bounded(lambda: read_images(str(styles), "style.images"), fifos=[pipe])
    finally:
        if server:
            server.close()
    assert [i.id for i in items] == ["a.png", "b.png"]
    (line,) = skipped_lines(caplog, "pipe.png")
    assert "not a regular file (fifo)" in line and str(pipe) in line
    if server:
        (line,) = skipped_lines(caplog, "s.png")
        assert "not a regular file (socket)" in line


def test_glob_listings_skip_fifos_for_images_and_prompts(tmp_path, styles, caplog):
    pipe = fifo(styles / "pipe.png")
    (tmp_path / "p1.txt").write_text("a fox\n")
    prompt_pipe = fifo(tmp_path / "p2.txt")  # read_prompts reads each match: a FIFO would block it forever
    with caplog.at_level(logging.WARNING):
        images = bounded(lambda: read_images(str(styles / "*.png"), "style.images"), fifos=[pipe])
        prompts = bounded(lambda: read_prompts(str(tmp_path / "p*.txt")), fifos=[prompt_pipe])
    assert [i.id for i in images] == ["a.png", "b.png"]
    assert [(i.id, i.prompt) for i in prompts] == [("p1.txt:1", "a fox")]
    assert len(skipped_lines(caplog, "pipe.png")) == 1
    assert "not a regular file (fifo)" in skipped_lines(caplog, "p2.txt")[0]


def test_glob_of_tars_skips_a_fifo_named_tar(tmp_path, caplog):
    wds_tar(tmp_path / "shard-0.tar", {"x": {"png": solid_png((1, 2, 3)), "txt": b"a cat"}})
    pipe = fifo(tmp_path / "shard-1.tar")
    with caplog.at_level(logging.WARNING):
        items = bounded(lambda: read_images(str(tmp_path / "shard-*.tar"), "content.images"), fifos=[pipe])
    assert [i.id for i in items] == ["shard-0.tar/x"]
    assert skipped_lines(caplog, "shard-1.tar")


@pytest.mark.parametrize("name", ["one.png", "x.tar", "m.jsonl"])
def test_a_named_fifo_image_source_is_a_source_error_naming_it(tmp_path, name):
    pipe = fifo(tmp_path / name)
    with pytest.raises(SourceError, match=r"style\.images: not a regular file \(fifo\)") as info:
        bounded(lambda: read_images(str(pipe), "style.images"), fifos=[pipe])
    assert str(pipe) in str(info.value)


def test_a_named_fifo_prompt_list_is_a_source_error(tmp_path):
    pipe = fifo(tmp_path / "prompts.txt")
    with pytest.raises(SourceError, match=r"content\.prompts: not a regular file \(fifo\)"):
        bounded(lambda: read_content(str(pipe), None), fifos=[pipe])


# ---- 2. no read blocks on a non-regular file ---------------------------------------------------------------


def test_read_range_refuses_fifo_and_device_without_blocking(tmp_path):
    pipe = fifo(tmp_path / "x.png")
    for offset, size in ((0, -1), (10, 20)):
        with pytest.raises(NotRegularFileError, match=r"not a regular file \(fifo\)") as info:
            bounded(lambda o=offset, s=size: read_range(str(pipe), o, s), fifos=[pipe])
        assert isinstance(info.value, OSError) and str(pipe) in str(info.value)
    with pytest.raises(NotRegularFileError, match="character device"):
        bounded(lambda: read_range("/dev/null"))
    with pytest.raises(NotRegularFileError, match="directory"):
        bounded(lambda: read_range(str(tmp_path)))


def test_read_range_still_reads_regular_files_and_ranges(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)))
    assert read_range(str(path)) == bytes(range(256))
    assert read_range(str(path), 10, 5) == bytes(range(10, 15))
    assert read_range("file://" + str(path), 250, 100) == bytes(range(250, 256))


def test_index_tar_refuses_a_fifo_named_tar(tmp_path):
    pipe = fifo(tmp_path / "x.tar")
    with pytest.raises(NotRegularFileError, match="fifo"):
        bounded(lambda: index_tar(str(pipe)), fifos=[pipe])


def test_decode_batch_fails_a_fifo_input_as_its_own_row(tmp_path, styles):
    pipe = fifo(tmp_path / "content.png")
    rows = [{"key": "k1", "content_url": str(pipe), "content_offset": 0, "content_size": -1,
             "style_url": str(styles / "a.png"), "style_offset": 0, "style_size": -1},
            {"key": "k2", "content_url": None, "content_offset": 0, "content_size": -1,
             "style_url": str(styles / "b.png"), "style_offset": 0, "style_size": -1}]
    out = bounded(lambda: decode_batch(to_table(rows), {}).to_pylist(), fifos=[pipe])
    assert out[0]["status"] == "failed"
    assert out[0]["reason"] == f"content: not a regular file (fifo): {pipe}"
    assert not out[1]["status"] and out[1]["style_bytes"]


def test_build_plan_on_a_style_folder_with_a_fifo_png_returns_without_it(tmp_path, styles):
    pipe = fifo(styles / "c.png")
    (tmp_path / "p.txt").write_text("a fox\na cat\n")
    cfg = validate_config({"output": {"path": str(tmp_path / "out")},
                           "content": {"prompts": str(tmp_path / "p.txt")},
                           "style": {"images": str(styles)},
                           "pairing": {"styles_per_content": 5}})
    plan = bounded(lambda: build_plan(cfg), fifos=[pipe])
    assert {s.style_id for s in plan} == {"a.png", "b.png"}
    assert len(plan) == 4


# ---- 5. the output folder is never an input ----------------------------------------------------------------


def test_output_inside_the_source_folders_is_not_planned(tmp_path, caplog):
    root = tmp_path / "corpus"
    (root / "styles").mkdir(parents=True)
    (root / "content").mkdir()
    (root / "styles" / "a.png").write_bytes(solid_png((200, 10, 10)))
    (root / "styles" / "b.png").write_bytes(solid_png((10, 10, 200)))
    wds_tar(root / "content" / "c.tar", {"c1": {"png": solid_png((9, 9, 9)), "txt": b"a fox"}})
    out = root / "out"  # a previous run's output, inside both the style folder and the content glob
    (out / "shards").mkdir(parents=True)
    (out / "report").mkdir()
    wds_tar(out / "shards" / "0123456789abcdef.tar",
            {"0123456789abcdef": {"png": solid_png((1, 1, 1)), "txt": b"a fox", "json": b"{}"}})
    (out / "report" / "grid.png").write_bytes(solid_png((5, 5, 5)))
    (out / "report" / "best.png").write_bytes(solid_png((6, 6, 6)))
    cfg = validate_config({"output": {"path": str(out)},
                           "content": {"images": str(root / "**" / "*.tar")},
                           "style": {"images": str(root)},
                           "pairing": {"styles_per_content": 10}})
    with caplog.at_level(logging.WARNING):
        plan = build_plan(cfg)
    assert {s.style_id for s in plan} == {"styles/a.png", "styles/b.png"}
    assert {s.content_id for s in plan} == {"content/c.tar/c1"}
    summary = skipped_lines(caplog, "under the output folder")
    assert any(m.startswith("style.images: skipped 2 file(s)") for m in summary), summary
    assert any(m.startswith("content.images: skipped 1 file(s)") for m in summary), summary


def test_exclusion_leaves_ids_and_keys_of_other_files_unchanged(tmp_path, styles):
    (tmp_path / "p.txt").write_text("a fox\n")
    base = {"content": {"prompts": str(tmp_path / "p.txt")}, "style": {"images": str(styles)},
            "pairing": {"styles_per_content": 2}}
    elsewhere = build_plan(validate_config(dict(base, output={"path": str(tmp_path / "out")})))
    (styles / "out" / "report").mkdir(parents=True)
    (styles / "out" / "report" / "grid.png").write_bytes(solid_png((5, 5, 5)))
    inside = build_plan(validate_config(dict(base, output={"path": str(styles / "out")})))
    assert [s.to_row() for s in inside] == [s.to_row() for s in elsewhere]


# ---- 6. symlinks stay inside the source root ---------------------------------------------------------------


@pytest.fixture
def linked(tmp_path, styles) -> Path:
    (styles / "sub").mkdir()
    (styles / "sub" / "real.png").write_bytes(solid_png((1, 2, 3)))
    os.symlink(styles / "sub" / "real.png", styles / "inside.png")
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "secret.png").write_bytes(solid_png((4, 5, 6)))
    os.symlink(other / "secret.png", styles / "outside.png")
    os.symlink(tmp_path / "gone.png", styles / "dangling.png")
    return styles


@pytest.mark.parametrize("glob", [False, True])
def test_symlinks_inside_the_root_are_listed_outside_ones_skipped(linked, caplog, glob):
    spec = str(linked / "*.png") if glob else str(linked)
    with caplog.at_level(logging.WARNING):
        ids = [i.id for i in read_images(spec, "style.images")]
    expected = ["a.png", "b.png", "inside.png"] + ([] if glob else ["sub/real.png"])
    assert ids == expected
    (line,) = skipped_lines(caplog, "outside.png")
    assert "outside" in line and "secret.png" in line
    assert skipped_lines(caplog, "dangling.png")


def test_follow_symlinks_opt_in_lists_links_out_of_the_root(linked):
    ids = [i.id for i in read_images(str(linked), "style.images", follow_symlinks=True)]
    assert "outside.png" in ids and "dangling.png" not in ids


# ---- 3. remote reads have timeouts -------------------------------------------------------------------------


def test_s3_storage_options_carry_timeouts_overridable_by_env(monkeypatch):
    monkeypatch.delenv("STYLEGEN_S3_CONNECT_TIMEOUT_S", raising=False)
    monkeypatch.delenv("STYLEGEN_S3_READ_TIMEOUT_S", raising=False)
    assert storage_options("s3://b/k")["config_kwargs"] == {
        "connect_timeout": pfs.S3_CONNECT_TIMEOUT_S, "read_timeout": pfs.S3_READ_TIMEOUT_S}
    monkeypatch.setenv("STYLEGEN_S3_CONNECT_TIMEOUT_S", "2.5")
    monkeypatch.setenv("STYLEGEN_S3_READ_TIMEOUT_S", "7")
    assert storage_options("s3://b/k")["config_kwargs"] == {"connect_timeout": 2.5, "read_timeout": 7.0}
    monkeypatch.setenv("STYLEGEN_S3_READ_TIMEOUT_S", "soon")
    assert storage_options("s3://b/k")["config_kwargs"]["read_timeout"] == pfs.S3_READ_TIMEOUT_S
    assert storage_options("/local/path") == {}


@pytest.mark.s3
def test_s3_client_is_built_with_the_timeouts(s3_env, monkeypatch):
    monkeypatch.setenv("STYLEGEN_S3_CONNECT_TIMEOUT_S", "3")
    monkeypatch.setenv("STYLEGEN_S3_READ_TIMEOUT_S", "11")
    url = f"s3://{s3_env['bucket']}/x.bin"
    s3_env["fs"].pipe_file(url, b"hello world")
    assert read_range(url, 6, 5) == b"world"
    fs, _ = pfs.get_fs(url)
    config = fs.s3.meta.config  # the botocore client's own Config: the kwargs reached botocore
    assert (config.connect_timeout, config.read_timeout) == (3.0, 11.0)


# ---- 4. transient errors are retried -----------------------------------------------------------------------


class _Flaky(BaseHTTPRequestHandler):
    """``/fail<N>/...`` answers 503 to its first N requests, then the bytes; ``/missing`` is a 404."""

    body = bytes(range(200))
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802 (http.server's name)
        with self.lock:
            self.seen[self.path] = self.seen.get(self.path, 0) + 1
            count = self.seen[self.path]
        if self.path.startswith("/missing"):
            return self._reply(404, b"no such object")
        failures = int(self.path.split("/")[1].removeprefix("fail"))
        if count <= failures:
            return self._reply(503, b"Service Unavailable")
        start, end = 0, len(self.body) - 1
        if "Range" in self.headers:
            start, end = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
        self._reply(206 if "Range" in self.headers else 200, self.body[start:end + 1])

    def _reply(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def flaky_http():
    pytest.importorskip("aiohttp")  # fsspec's http filesystem needs it (a pinned dependency here)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    _Flaky.seen = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Flaky.seen
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_read_range_succeeds_after_fewer_transient_failures_than_attempts(flaky_http, caplog):
    base, seen = flaky_http
    n = pfs.READ_ATTEMPTS - 1
    with caplog.at_level(logging.WARNING, logger="pipeline.io.fs"):
        assert bounded(lambda: read_range(f"{base}/fail{n}/x.png")) == _Flaky.body
        assert bounded(lambda: read_range(f"{base}/fail1/y.png", 10, 5)) == _Flaky.body[10:15]
    assert seen == {f"/fail{n}/x.png": n + 1, "/fail1/y.png": 2}
    retries = [r.getMessage() for r in caplog.records if "transient error" in r.getMessage()]
    assert len(retries) == n + 1 and all("503" in m for m in retries)


def test_read_range_gives_up_after_attempts_transient_failures(flaky_http):
    base, seen = flaky_http
    started = time.monotonic()
    with pytest.raises(Exception, match="503"):
        bounded(lambda: read_range(f"{base}/fail99/z.png"))
    assert seen == {"/fail99/z.png": pfs.READ_ATTEMPTS}
    assert time.monotonic() - started < LIMIT_S


def test_read_range_does_not_retry_a_404(flaky_http):
    base, seen = flaky_http
    with pytest.raises(FileNotFoundError):
        bounded(lambda: read_range(f"{base}/missing/x.png"))
    assert seen == {"/missing/x.png": 1}


def test_retry_transient_retries_only_transient_errors():
    calls = []

    def reset_twice():
        calls.append(1)
        if len(calls) <= 2:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert retry_transient(reset_twice, attempts=3, base_delay_s=0.001) == "ok" and len(calls) == 3
    for permanent in (FileNotFoundError("s3://b/503.png"), PermissionError("denied"), ValueError("bad bytes")):
        calls.clear()

        def fail(exc=permanent):
            calls.append(1)
            raise exc

        with pytest.raises(type(permanent)):
            retry_transient(fail, attempts=4, base_delay_s=0.001)
        assert len(calls) == 1, permanent


def test_is_transient_classification():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    slow_down = ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}},
                            "GetObject")
    wrapped = OSError("cannot read")
    wrapped.__cause__ = slow_down
    for exc in (TimeoutError(), ConnectionResetError(), EndpointConnectionError(endpoint_url="http://s3"),
                ReadTimeoutError(endpoint_url="http://s3"), slow_down, wrapped,
                OSError("An error occurred (InternalError) when calling the GetObject operation")):
        assert is_transient(exc), exc
    for exc in (FileNotFoundError("x"), PermissionError("x"), NotRegularFileError("x"), ValueError("x"),
                ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "GetObject")):
        assert not is_transient(exc), exc


def test_filter_never_lists_its_own_output_among_its_input_shards(tmp_path, caplog):
    from pipeline.config import FilterRunConfig
    from pipeline.filter.inputs import list_inputs

    root = tmp_path / "corpus"
    (root / "raw").mkdir(parents=True)
    (root / "filtered" / "shards").mkdir(parents=True)
    wds_tar(root / "raw" / "a.tar", {"s1": {"png": solid_png((9, 9, 9)), "txt": b"a fox"}})
    out = root / "filtered"  # a previous filter's output, matched by the input glob
    wds_tar(out / "shards" / "0123456789abcdef.tar", {"s1": {"png": solid_png((9, 9, 9)), "txt": b"a fox"}})
    cfg = validate_config({"input": {"shards": str(root / "**" / "*.tar")}, "output": {"path": str(out)}},
                          schema=FilterRunConfig)
    with caplog.at_level(logging.WARNING):
        jobs = list_inputs(cfg)
    assert [base for _, base in jobs] == ["raw/a.tar"]
    assert any(m.startswith("input.shards: skipped 1 file(s)") for m in skipped_lines(caplog, "output folder"))
