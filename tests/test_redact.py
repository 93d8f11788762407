"""Secrets never leave the environment, and readers trust nothing (issue 26; README "Security").

A sentinel secret put in ``ray.runtime_env.env_vars`` and in source URLs (``user:SECRET@``, presigned query
parameters) of a real embedded run is found nowhere under the output (every byte of every file: tars, parquet,
JSON), the report folder, the Ray session logs of that run, or the console, while the run's Ray workers still see
the env var. ``report`` and ``reproduce`` on an edited output: no markup injected, a ``shard`` is only a plain file
name under ``shards/``, stored images decode under the run's pixel limit, a URL whose credentials were not stored
is not requested.
"""

from __future__ import annotations

import html
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.redact import REDACTED, SECRET_ENV, public_config, redact_text, redact_url, register_secrets
from pipeline.schema import INDEX_SCHEMA
from tests.hostile_corpus import textured
from tests.http_counter import CountingServer
from tests.unit_helpers import png_bytes

REPO = Path(__file__).resolve().parents[1]
SENTINEL = "SENTINEL-7f3a9c2e51d4b8"
FORMS = (SENTINEL.encode(), quote(SENTINEL).encode(), SENTINEL.encode("utf-16-le"))
LIMIT_S = 420


# ---- helpers ------------------------------------------------------------------------------------------------------
def leaks(root: Path) -> list[str]:
    """Files under ``root`` whose bytes hold the sentinel (plain, URL-quoted or UTF-16)."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if any(form in data for form in FORMS):
                found.append(str(path))
    return found


def cli(*args: str, env: dict | None = None, timeout: float = LIMIT_S) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # our own session only: the CLI and the Ray it started
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"stylegen {args[0]} did not finish within {timeout}s:\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class Tags(HTMLParser):
    """Every start tag and its attributes, as a browser's tokenizer sees them."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))


def parse(html: str) -> Tags:
    tags = Tags()
    tags.feed(html)
    return tags


# ---- redaction of URLs, text, configs ------------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    f"https://user:{SENTINEL}@host.example/a.png",
    f"https://{SENTINEL}@host.example/a.png",
    f"https://b.s3.amazonaws.com/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={SENTINEL}%2F20260101"
    f"&X-Amz-Signature={SENTINEL}&X-Amz-Security-Token={SENTINEL}",
    f"https://storage.googleapis.com/b/a.png?X-Goog-Credential={SENTINEL}&X-Goog-Signature={SENTINEL}",
    f"https://acct.blob.core.windows.net/c/a.png?sv=2022-11-02&se={SENTINEL}&sp=r&sig={SENTINEL}",
    f"https://h/a.png?Signature={SENTINEL}&AWSAccessKeyId={SENTINEL}&Expires=1",
    f"https://h/a.png?token={SENTINEL}", f"https://h/a.png?access_token={SENTINEL}",
    f"https://h/a.png?key={SENTINEL}", f"https://h/a.png?API_KEY={SENTINEL}", f"https://h/a.png#access_token={SENTINEL}",
    f"s3://AKIA:{SENTINEL}@bucket/a.png",
])
def test_redact_url_removes_credentials_and_signing_parameters(url):
    clean = redact_url(url)
    assert SENTINEL not in clean and quote(SENTINEL) not in clean and REDACTED in clean, clean
    assert clean.split("://")[0] == url.split("://")[0]
    assert redact_url(clean) == clean  # idempotent
    text = f"cannot read {url}: HTTPError 403 (from {url})"
    assert SENTINEL not in redact_text(text) and redact_text(text).startswith("cannot read ")
    assert redact_text(text).endswith(")")


def test_redact_url_keeps_a_plain_url_byte_for_byte():
    for url in ("https://h.example:8443/a%20b.png?w=64&fmt=png#frag", "s3://bucket/prefix/x.tar", "/local/a.png",
                "file:///data/x.png"):
        assert redact_url(url) == url
        assert redact_text(f"not found: {url}") == f"not found: {url}"


def test_public_config_masks_env_var_values_and_known_secrets_everywhere():
    cfg = {"ray": {"runtime_env": {"env_vars": {"HF_TOKEN": SENTINEL, "MODE": "x"}, "pip": ["a"]}},
           "content": {"images": f"https://u:{SENTINEL}@h/m.jsonl"}, "note": f"token is {SENTINEL}"}
    out = public_config(cfg)
    assert out["ray"]["runtime_env"] == {"env_vars": {"HF_TOKEN": REDACTED, "MODE": REDACTED}, "pip": ["a"]}
    assert SENTINEL not in json.dumps(out)
    assert cfg["ray"]["runtime_env"]["env_vars"]["HF_TOKEN"] == SENTINEL  # the config itself keeps the real value
    register_secrets([SENTINEL])
    assert redact_text(f"x {SENTINEL} y") == f"x {REDACTED} y"


def test_submitted_job_gets_env_vars_but_its_config_does_not(tmp_path):
    from jobs.submit import CONFIG_ENV, runtime_env, submission_base
    from pipeline.config import validate_config

    cfg = validate_config({"output": {"path": str(tmp_path / "o")}, "content": {"prompts": str(tmp_path / "p.txt")},
                           "style": {"images": str(tmp_path / "s")},
                           "ray": {"runtime_env": {"env_vars": {"HF_TOKEN": SENTINEL}}}})
    env = runtime_env(cfg)
    assert env["env_vars"]["HF_TOKEN"] == SENTINEL  # the job and its workers receive the value
    assert env["env_vars"][SECRET_ENV] == "HF_TOKEN"  # and know to redact it
    job_text = env["env_vars"][CONFIG_ENV]
    assert SENTINEL not in job_text
    job_cfg = validate_config(yaml.safe_load(job_text))  # what the job's entrypoint parses
    assert job_cfg.ray.runtime_env["env_vars"] == {"HF_TOKEN": REDACTED}
    assert SENTINEL not in json.dumps({k: v for k, v in env.items() if k != "env_vars"})
    # the job id is public (dashboard, console): derived from the config without the values, so it cannot be used
    # to guess them, and a resubmission with a rotated token still finds the running job
    other = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"runtime_env": {"env_vars": {"HF_TOKEN": "x"}}})})
    assert submission_base(other) == submission_base(cfg)


# ---- a real embedded run -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sentinel_secret_is_nowhere_in_output_report_logs_or_console(tmp_path):
    content, style = tmp_path / "content", tmp_path / "style"
    content.mkdir()
    style.mkdir()
    textured((40, 40), seed=1).save(content / "c0.png")
    textured((32, 32), seed=2).save(style / "s0.png")
    cache = tmp_path / f"cache-{SENTINEL}"  # only the run's Ray workers get this location (config env_vars)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # this run's Ray session logs (short: socket paths)
    out, report = tmp_path / "out", tmp_path / "report"
    with CountingServer(png_bytes(textured((40, 40), seed=3))) as server:
        base = f"http://127.0.0.1:{server.port}"
        rows = [{"image": "c0.png", "prompt": "a local picture"},
                {"image": f"http://user:{SENTINEL}@127.0.0.1:{server.port}/img.png", "prompt": "userinfo"},
                {"image": f"{base}/img.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={SENTINEL}%2F2026"
                          f"&X-Amz-Signature={SENTINEL}", "prompt": "presigned"},
                {"image": f"{base}/gone.png?token={SENTINEL}", "prompt": "gone"}]
        (content / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump({
            "output": {"path": str(out), "samples_per_shard": 2, "include_inputs": True},
            "content": {"images": str(content / "m.jsonl")},
            "style": {"images": str(style)},
            "decode": {"max_side": 48},
            "operator": {"name": "color-transfer", "batch_size": 2},
            "scoring": {"clip_model": "tiny:clip", "batch_size": 4},
            "ray": {"runtime_env": {"env_vars": {"STYLEGEN_TEST_TOKEN": SENTINEL, "STYLEGEN_CACHE": str(cache)}}},
        }))
        try:
            proc = cli("run", str(config), env={"RAY_TMPDIR": str(ray_tmp)})
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
            rep = cli("report", str(out), "--out", str(report))
            assert rep.returncode == 0, rep.stderr[-3000:]
            assert (cache / "tiny").is_dir(), "the run's Ray workers did not get ray.runtime_env.env_vars"
            for name, text in (("run", proc.stdout + proc.stderr), ("report", rep.stdout + rep.stderr)):
                assert not any(form.decode("utf-8", "ignore") in text for form in FORMS[:2]), name
            assert leaks(out) == [] and leaks(report) == []
            sessions = list(ray_tmp.rglob("session_*"))
            assert sessions, f"no Ray session under {ray_tmp}"
            assert leaks(ray_tmp) == []
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["ray"]["runtime_env"]["env_vars"] == {"STYLEGEN_TEST_TOKEN": REDACTED,
                                                                   "STYLEGEN_CACHE": REDACTED}
    index = pq.read_table(out / "index").to_pylist()
    assert len(index) == 4
    by_prompt = {r["prompt"]: r for r in index}
    assert by_prompt["a local picture"]["status"] == "kept"
    assert by_prompt["gone"]["status"] == "failed"
    for prompt in ("userinfo", "presigned", "gone"):  # recorded, without the credentials
        row = by_prompt[prompt]
        assert REDACTED in (row["content_id"] or ""), row
        assert row["content_url"] is None or REDACTED in row["content_url"], row
    page = html.unescape((report / "report.html").read_text())
    assert f'"STYLEGEN_TEST_TOKEN": "{REDACTED}"' in page  # the config block shows the name, not the value


# ---- readers of an edited output -----------------------------------------------------------------------------------
KEYS = {name: f"{i:016x}" for i, name in enumerate(
    ("inject", "dotdot", "absolute", "subdir", "bomb", "oldreason", "redacted", "good"), start=1)}


def _tar(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def edited_output(root: Path, port: int) -> Path:
    """An output as someone might hand it over: index values that try to inject markup and to escape
    ``shards/``, a stored image above the run's pixel limit, an old unredacted reason and env var value in
    run.json, and a kept row whose style URL was stored redacted."""
    out = root / "out"
    img = png_bytes(textured((16, 16), seed=5))
    big = png_bytes(textured((80, 80), seed=6))  # 6,400 pixels > decode.max_pixels 4,096 below
    _tar(root / "evil.tar", {f"{KEYS['dotdot']}.png": img})
    _tar(root / "abs.tar", {f"{KEYS['absolute']}.png": img})
    _tar(out / "shards" / "sub" / "x.tar", {f"{KEYS['subdir']}.png": img})
    _tar(out / "shards" / "good.tar", {f"{KEYS['bomb']}.png": big, f"{KEYS['redacted']}.png": img,
                                       f"{KEYS['good']}.png": img})
    base = {name: None for name in INDEX_SCHEMA.names}

    def row(name, **values):
        return {**base, "key": KEYS[name], "status": "kept", "prompt": name, "content_id": name, "style_id": "s",
                "seed": 1, "clip_content": 0.5, "clip_style": 0.5, "content_offset": 0, "content_size": -1,
                "style_offset": 0, "style_size": -1, **values}

    rows = [
        row("inject", status="x onmouseover=alert(1)", reason='"><script>alert(1)</script>',
            style_id='"><img src=x onerror=alert(1)>'),
        row("dotdot", shard="../evil.tar"),
        row("absolute", shard=str(root / "abs.tar")),
        row("subdir", shard="sub/x.tar"),
        row("bomb", shard="good.tar"),
        row("oldreason", status="failed", reason=f"style: cannot read https://h/x.png?sig={SENTINEL}: 403",
            clip_content=None, clip_style=None),
        row("redacted", shard="good.tar", style_url=f"http://{REDACTED}@127.0.0.1:{port}/img.png"),
        row("good", shard="good.tar", prompt='<img src=x onerror="alert(3)">'),
    ]
    (out / "index").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), out / "index" / "0000000000000001.parquet")
    config = {"output": {"path": str(out)}, "content": {"prompts": str(root / "gone" / "p.txt")},
              "style": {"images": str(root / "gone")}, "decode": {"max_pixels": 4096},
              "operator": {"name": "color-transfer"}, "scoring": {"clip_model": "tiny:clip"},
              "ray": {"runtime_env": {"env_vars": {"HF_TOKEN": SENTINEL}}}}  # written before redaction existed
    (out / "run.json").write_text(json.dumps({"config": config, "finished_at": '"><script>alert(4)</script>',
                                              "dataset": {"planned": "<script>alert(2)</script>"}}))
    return out


@pytest.mark.slow
def test_report_on_an_edited_output_injects_nothing_and_reads_only_its_shards(tmp_path):
    with CountingServer(png_bytes(textured((40, 40), seed=3))) as server:
        out = edited_output(tmp_path, server.port)
        report = tmp_path / "report"
        proc = cli("report", str(out), "--out", str(report), timeout=180)
        assert server.requests == []  # a URL whose credentials were not stored is never requested
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    page = (report / "report.html").read_text()
    tags = parse(page)
    assert not [t for t, _ in tags.tags if t == "script"]
    handlers = [(t, a) for t, attrs in tags.tags for a, _ in attrs if a.lower().startswith("on")]
    assert handlers == [], handlers
    assert not [v for t, attrs in tags.tags if t == "img" for a, v in attrs if a == "src" and v == "x"]
    assert "x onmouseover=alert(1)" in html.unescape(page)  # shown, as text
    assert leaks(report) == [] and SENTINEL not in proc.stdout + proc.stderr
    for name in ("../evil.tar", str(tmp_path / "abs.tar"), "sub/x.tar"):
        assert f"shard {name!r} is not a plain file name under shards/" in proc.stderr, (name, proc.stderr)
    assert "exceeds max_pixels=4096" in proc.stderr, proc.stderr
    assert "source URL carried credentials and was not stored" in proc.stderr, proc.stderr


def test_report_loads_images_only_from_plain_shard_names_under_the_pixel_limit(tmp_path):
    from pipeline.output.store import OutputStore
    from pipeline.review.report import load_stored

    out = edited_output(tmp_path, 9)
    rows = pq.read_table(out / "index").to_pylist()
    images = load_stored(OutputStore(str(out)), rows, max_pixels=4096)
    assert set(images) == {KEYS["redacted"], KEYS["good"]}  # not ../, absolute, sub/, nor the oversized image
    assert images[KEYS["good"]].output.size == (16, 16)


@pytest.mark.slow
@pytest.mark.parametrize("name, expect", [
    ("dotdot", "shard '../evil.tar' is not a plain file name under shards/"),
    ("subdir", "shard 'sub/x.tar' is not a plain file name under shards/"),
    ("bomb", "exceeds max_pixels=4096"),
    ("redacted", "style source URL carried credentials and was not stored"),
])
def test_reproduce_on_an_edited_output_fails_that_sample_with_a_reason(tmp_path, name, expect):
    with CountingServer(png_bytes(textured((40, 40), seed=3))) as server:
        out = edited_output(tmp_path, server.port)
        proc = cli("reproduce", str(out), KEYS[name], timeout=180)
        assert server.requests == []
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    assert expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert SENTINEL not in proc.stdout + proc.stderr


def test_stored_image_decodes_under_the_pixel_limit(tmp_path):
    from pipeline.review.untrusted import UntrustedValue, open_stored

    data = png_bytes(Image.new("RGB", (100, 50), (1, 2, 3)))
    assert open_stored(data, 5000).size == (100, 50)
    with pytest.raises(UntrustedValue, match="exceeds max_pixels=4999"):
        open_stored(data, 4999)


# ---- logs and console ----------------------------------------------------------------------------------------------
def test_log_lines_and_tracebacks_carry_no_url_credential_or_env_secret(monkeypatch):
    import logging

    import pipeline  # noqa: F401 - importing the package installs the redaction, in every process that runs it

    monkeypatch.setenv("STYLEGEN_TEST_API_TOKEN", f"env-{SENTINEL}")
    monkeypatch.setenv(SECRET_ENV, "STYLEGEN_TEST_API_TOKEN")  # as a worker of a run with that env var has it
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("tests.safety_secrets")
    log.addHandler(handler)
    try:
        log.warning("cannot read %s (token %s)", f"https://h/a.png?X-Amz-Signature={SENTINEL}",
                    f"env-{SENTINEL}")
        try:
            raise OSError(f"403 for https://user:{SENTINEL}@h/a.png")
        except OSError:
            log.exception("decode failed")
    finally:
        log.removeHandler(handler)
    text = buf.getvalue()
    assert "X-Amz-Signature=***" in text and "OSError: 403 for https://***@h/a.png" in text, text
    assert SENTINEL not in text


def test_cli_error_line_shows_no_url_credential(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "output": {"path": str(tmp_path / "out")},
        "content": {"images": f"file://{tmp_path}/missing/a.png?X-Amz-Signature={SENTINEL}"},
        "style": {"images": str(tmp_path / "missing")}}))
    proc = cli("validate", str(config), timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
    assert SENTINEL not in proc.stdout + proc.stderr, proc.stderr  # the URL is named, its signature is not


def test_plan_out_stores_no_url_credential(tmp_path):
    content, style = tmp_path / "content", tmp_path / "style"
    content.mkdir()
    style.mkdir()
    textured((32, 32), seed=2).save(style / "s0.png")
    textured((32, 32), seed=1).save(content / "c0.png")
    rows = [{"image": "c0.png", "prompt": "local"},
            {"image": f"http://user:{SENTINEL}@127.0.0.1:9/a.png", "prompt": "userinfo"},
            {"image": f"http://127.0.0.1:9/b.png?X-Amz-Signature={SENTINEL}", "prompt": "presigned"}]
    (content / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output": {"path": str(tmp_path / "out")},
                                      "content": {"images": str(content / "m.jsonl")},
                                      "style": {"images": str(style)}}))
    plan = tmp_path / "plan"
    proc = cli("plan", str(config), "--quiet", "--out", str(plan), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(plan)
    assert table.num_rows == 3 and leaks(plan) == [] and SENTINEL not in proc.stdout + proc.stderr
    assert str(content / "c0.png") in table.column("content_url").to_pylist()  # a plain location stays as it is
