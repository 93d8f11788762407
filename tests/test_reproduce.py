"""`stylegen reproduce`: a stored sample regenerates bit for bit from its recorded settings and inputs."""

from __future__ import annotations

import contextlib
import io
import logging
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import validate_config
from pipeline.generate.run import run
from pipeline.io.images import encode_image
from pipeline.review.reproduce import NotReproducible, UnknownKey, compare, reproduce
from tests.invariants import read_index


def _run(out: Path, samples: Path, operator: dict, **extra) -> list[dict]:
    cfg = validate_config({
        "output": {"path": str(out), "samples_per_shard": 2},
        "content": {"images": str(samples / "content"), "prompts": str(samples / "prompts.txt")},
        "style": {"images": str(samples / "style")},
        "pairing": {"styles_per_content": 1, "seed": 5, "limit": 2},
        "decode": {"max_side": 64},
        "operator": operator,
        "scoring": {"clip_model": "tiny:clip"},
        **extra,
    })
    with caplog_progress() as records:
        assert run(cfg, quiet=True).kept == 2
    assert not records, "quiet runs must not log progress"
    return [r for r in read_index(str(out)) if r["status"] == "kept"]


@contextlib.contextmanager
def caplog_progress():
    """Collect the records of the progress logger (quiet runs must produce none)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("pipeline.output.progress")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _cli(*args: str):
    """The CLI in process (typer's runner): exit code and output without a new interpreter's imports."""
    from typer.testing import CliRunner

    from jobs.cli import app

    return CliRunner().invoke(app, ["reproduce", *args])


def test_color_transfer_reproduces_and_detects_a_changed_image(ray_local, samples, tmp_path):
    out = tmp_path / "ct"
    kept = _run(out, samples, {"name": "color-transfer", "params": {"strength": 0.7}, "batch_size": 2})
    for row in kept:
        result = reproduce(str(out), row["key"])
        assert result.identical and result.max_abs_diff == 0 and result.psnr_db is None, result.line()
        assert result.bytes_identical, result.line()  # bit for bit, not only the same pixels

    # Tamper with one stored output: the CLI must see the difference and measure it.
    key = kept[0]["key"]
    shard = out / "shards" / kept[0]["shard"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == f"{key}.png":
                im = Image.open(io.BytesIO(data)).convert("RGB")
                im.putpixel((0, 0), tuple((c + 40) % 256 for c in im.getpixel((0, 0))))
                data = encode_image(im, "png")
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    proc = _cli(str(out), key)
    assert proc.exit_code == 1, proc.output
    assert "different" in proc.stdout and "max_abs_diff=" in proc.stdout and "psnr=" in proc.stdout

    proc = _cli(str(out), kept[1]["key"])
    assert proc.exit_code == 0 and proc.stdout.startswith("identical"), proc.output

    proc = _cli(str(out), "0123456789abcdef")
    assert proc.exit_code == 2 and proc.stderr.startswith("error: unknown key"), proc.output
    with pytest.raises(UnknownKey):
        reproduce(str(out), "nope")
    (out / "run.json").unlink()
    with pytest.raises(NotReproducible, match="run.json"):
        reproduce(str(out), key)


def test_sissi_tiny_flux_reproduces_bit_for_bit(ray_local, samples, tmp_path):
    out = tmp_path / "sissi"
    kept = _run(out, samples, {"name": "sissi", "model": "tiny:flux-fill",
                               "params": {"panel_size": 64, "steps": 2}, "batch_size": 1})
    result = reproduce(str(out), kept[0]["key"])
    assert result.identical and result.bytes_identical, result.line()
    assert result.operator == "sissi" and result.device == "cpu"


def test_compare_measures_differences():
    a = Image.new("RGB", (8, 8), (10, 20, 30))
    b = a.copy()
    assert compare(a, b) == (0, None)
    b.putpixel((3, 3), (13, 20, 30))
    diff, psnr = compare(a, b)
    assert diff == 3 and psnr == pytest.approx(10 * __import__("math").log10(255**2 / (9 / 192)))
