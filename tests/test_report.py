"""`stylegen report` and the dataset card on a finished run, a partial run and an S3 output."""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import validate_config
from pipeline.generate.run import run
from pipeline.review.report import CAPTION_H, SAMPLES_PER_ROW, TILE, histogram, make_report
from tests.invariants import read_index

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def finished(ray_local, samples, tmp_path_factory) -> Path:
    """A color-transfer run with content images, a broken input (failed) and a style threshold (rejected)."""
    root = tmp_path_factory.mktemp("report")
    content = root / "content"
    content.mkdir()
    for p in sorted((samples / "content").iterdir())[:4]:
        shutil.copy(p, content / p.name)
    (content / "broken.jpg").write_bytes(os.urandom(1024))
    out = root / "out"
    cfg = validate_config({
        "output": {"path": str(out), "samples_per_shard": 2},
        "content": {"images": str(content), "prompts": str(samples / "prompts.txt")},
        "style": {"images": str(samples / "style")},
        "pairing": {"styles_per_content": 2, "seed": 3},
        "decode": {"max_side": 64},
        "operator": {"name": "color-transfer", "batch_size": 2},
        "scoring": {"clip_model": "tiny:clip", "batch_size": 4},
        "filter": {"min_style": 0.0},
    })
    # Not quiet, progress every 0.2 s: test_run_logged_progress checks the lines this run logged.
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("pipeline.output.progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    os.environ["STYLEGEN_PROGRESS_S"] = "0.2"
    try:
        summary = run(cfg, quiet=False)
    finally:
        os.environ.pop("STYLEGEN_PROGRESS_S")
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert summary.planned == 10 and summary.failed == 2
    (out / "progress.log").write_text("\n".join(r.getMessage() for r in records))
    return out


def test_run_logged_progress(finished):
    lines = (finished / "progress.log").read_text().splitlines()
    assert len(lines) >= 2, lines
    assert all(ln.startswith("progress: written ") and " samples/s | ETA " in ln for ln in lines)
    assert lines[-1].startswith("progress: written 10/10 (100.0%)") and "failed=2" in lines[-1]


def screenshot(html: str, dest: Path, tmp: Path) -> np.ndarray:
    """Render a page in headless Chromium and return the screenshot's pixels."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed (apt-get install -y chromium)"
    proc = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}",
                           f"--screenshot={dest}", "--window-size=1200,1600", Path(html).resolve().as_uri()],
                          capture_output=True, text=True, timeout=60)
    assert dest.exists(), proc.stderr[-2000:]
    return np.asarray(Image.open(dest).convert("RGB"), dtype=np.float64)


def check_sheet(report, n_samples: int) -> Image.Image:
    sheet = Image.open(report.contact_sheet)
    rows = math.ceil(n_samples / SAMPLES_PER_ROW)
    assert sheet.size == (SAMPLES_PER_ROW * len(report.sheet_columns) * TILE, rows * (TILE + CAPTION_H))
    return sheet


def test_report_on_finished_run_renders_in_chromium(finished, tmp_path):
    rows = read_index(str(finished))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("kept", "rejected", "failed")}
    assert counts["failed"] == 2 and counts["kept"] >= 1
    report = make_report(str(finished), str(tmp_path / "rep"))
    assert report.counts == {k: v for k, v in counts.items() if v}
    assert report.sheet_samples == counts["kept"]
    # Content images exist and the inputs were not stored: they were re-read from the recorded source URLs.
    assert report.sheet_columns == ["content", "style", "output"]
    sheet = np.asarray(check_sheet(report, counts["kept"]), dtype=np.float64)
    for col in range(3):  # every panel of the first sample holds a picture, not the flat "missing" tile
        assert sheet[:TILE, col * TILE:(col + 1) * TILE].std() > 10, col
    for name, path in report.histograms.items():
        im = Image.open(path)
        assert im.size == (520, 260), name
        assert np.asarray(im.convert("L")).std() > 5
    page = Path(report.html).read_text()
    assert "contact_sheet.png" in page and "hist_clip_style.png" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network
    assert "not an image" in page  # the failure reason is listed
    assert "min_style" in page  # the configuration is shown

    shot = screenshot(report.html, tmp_path / "shot.png", tmp_path)
    assert shot.shape[:2] == (1600, 1200)
    assert shot.std() > 20, "blank screenshot"
    assert shot[800:1600].std() > 20, "the contact sheet did not render"

    card = (finished / "README.md").read_text()
    assert "status: **complete**" in card
    assert f"| 10 | {counts['kept']} | {counts['rejected']} | {counts['failed']} |" in card
    assert "clip_style" in card and "License" in card


def test_histogram_draws_the_threshold():
    im = np.asarray(histogram({"kept": [0.5, 0.6, 0.7], "rejected": [0.1, 0.2]}, "t", 0.3))
    red = (im[..., 0] > 180) & (im[..., 1] < 40) & (im[..., 2] < 40)
    cols = np.nonzero(red[30:220].any(axis=0))[0]
    # The dashed line sits at 0.3 on a 0.1..0.7 axis: a third of the way across the plot area (x 44..508).
    assert len(cols) and abs(cols.min() - (44 + (0.3 - 0.1) / 0.6 * 464)) < 4
    without = np.asarray(histogram({"kept": [0.5, 0.6]}, "t", None))
    assert not ((without[..., 0] > 180) & (without[..., 1] < 40) & (without[..., 2] < 40)).any()


def test_report_on_partial_run(finished, tmp_path):
    """A run killed midway: some index files, their shards, no run.json, no card."""
    part = tmp_path / "partial"
    shutil.copytree(finished, part, ignore=shutil.ignore_patterns("report", "README.md", "run.json",
                                                                    "progress.log"))
    index_files = sorted((part / "index").glob("*.parquet"))
    for p in index_files[len(index_files) // 2:]:
        p.unlink()
        shard = part / "shards" / (p.stem + ".tar")
        shard.unlink(missing_ok=True)
    rows = read_index(str(part))
    assert 0 < len(rows) < 10
    kept = sum(r["status"] == "kept" for r in rows)
    report = make_report(str(part))
    assert Path(report.html) == part / "report" / "report.html"
    assert sum(report.counts.values()) == len(rows)
    page = Path(report.html).read_text()
    assert "No <code>run.json</code>" in page
    if kept:
        check_sheet(report, kept)
    shot = screenshot(report.html, tmp_path / "shot.png", tmp_path)
    assert shot.std() > 20


def test_report_on_s3_output_and_cli(finished, s3_env, tmp_path):
    fs, bucket = s3_env["fs"], s3_env["bucket"]
    fs.put(str(finished), f"{bucket}/run", recursive=True)
    url = f"s3://{bucket}/run"
    out = tmp_path / "s3rep"
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "report", url, "--out", str(out)], cwd=REPO,
                          env={**os.environ, **s3_env["env"]}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("report.html")
    page = (out / "report.html").read_text()
    assert url in page and "contact_sheet.png" in page
    assert Image.open(out / "contact_sheet.png").size[0] == SAMPLES_PER_ROW * 3 * TILE
