"""Damage found and repaired (docs/architecture.md §5.5): `stylegen verify [--repair]`, the start-up repair of `run`,
and `--retry-failed` superseding failed rows, on real outputs of real runs (embedded Ray)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.generate.run import run
from pipeline.output.integrity import check
from pipeline.output.store import OutputStore
from pipeline.plan.keys import build_plan
from tests.invariants import check_invariants, read_index
from tests.test_run import make_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _verify(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", "verify", str(out), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _finished(tmp_path: Path, samples: Path, name: str = "out"):
    out = tmp_path / name
    cfg = make_config(out, {"images": str(samples / "content")}, str(samples / "style"), pairing={"limit": 12})
    run(cfg, quiet=True)
    planned = {s.key for s in build_plan(cfg)}
    check_invariants(str(out), planned)
    return out, cfg, planned


def _kept_shards(out: Path) -> list[Path]:
    return sorted((out / "shards").glob("*.tar"))


def test_verify_names_each_damaged_file_and_the_next_run_repairs_it(ray_local, samples, tmp_path):
    out, cfg, planned = _finished(tmp_path, samples)
    assert _verify(out).returncode == 0
    shards = _kept_shards(out)
    assert len(shards) >= 3
    deleted, truncated = shards[0], shards[1]
    broken_index = out / "index" / f"{shards[2].stem}.parquet"
    deleted.unlink()
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    with open(broken_index, "r+b") as f:
        f.truncate(50)

    proc = _verify(out)
    assert proc.returncode == 1, proc.stdout
    lines = proc.stdout.splitlines()
    assert any(str(out / "index" / f"{deleted.stem}.parquet") in line and "missing" in line for line in lines)
    assert any(str(truncated) in line and "truncated" in line for line in lines)
    assert any(str(broken_index) in line and "unreadable" in line for line in lines)

    # The next run finds the same damage by listing alone, quarantines it and redoes those samples.
    summary = run(cfg, quiet=True)
    assert summary.repaired == 3
    assert summary.kept == 12 - summary.skipped and summary.skipped < 12
    check_invariants(str(out), planned)
    assert _verify(out).returncode == 0
    quarantined = {p.name for p in (out / "_quarantine").rglob("*") if p.is_file()}
    assert {truncated.name, broken_index.name, f"{deleted.stem}.parquet"} <= quarantined  # moved, not deleted


def test_verify_repair_quarantines_deep_damage_and_duplicates(ray_local, samples, tmp_path):
    out, cfg, planned = _finished(tmp_path, samples)
    shards = _kept_shards(out)
    # Same size, garbled header: only a deep check (reading the tar) can see it.
    garbled = shards[0]
    data = bytearray(garbled.read_bytes())
    data[0:100] = b"\xff" * 100
    garbled.write_bytes(bytes(data))
    # A key indexed twice (what two unleased writers produced): an index file copied under another name.
    twin_src = out / "index" / f"{shards[1].stem}.parquet"
    twin = out / "index" / "ffffffffffffffff.parquet"
    shutil.copy(twin_src, twin)
    stray = out / "shards" / "notes.txt"
    stray.write_text("not a shard")

    assert check(OutputStore(str(out)), deep=False)  # the twin and the stray are seen by listing too
    proc = _verify(out)
    assert proc.returncode == 1
    assert f"{garbled}: unreadable tar" in proc.stdout
    assert str(twin) in proc.stdout and "indexed twice" in proc.stdout
    assert str(stray) in proc.stdout

    repaired = _verify(out, "--repair")
    assert repaired.returncode == 0, repaired.stdout
    assert "repaired: moved" in repaired.stdout
    assert _verify(out).returncode == 0
    assert not garbled.exists() and not twin.exists() and not stray.exists()
    assert (out / "_quarantine").is_dir()

    summary = run(cfg, quiet=True)
    assert summary.repaired == 0 and summary.kept > 0
    check_invariants(str(out), planned)


def test_truncated_index_is_one_warning_in_report(ray_local, samples, tmp_path):
    out, _, _ = _finished(tmp_path, samples)
    broken = sorted((out / "index").glob("*.parquet"))[0]
    broken.write_bytes(broken.read_bytes()[:40])
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "report", str(out), "--out", str(tmp_path / "rep")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert str(broken) in proc.stderr


def test_retry_failed_turns_fixed_inputs_into_kept_samples(ray_local, samples, tmp_path):
    styles = tmp_path / "styles"
    styles.mkdir()
    good = sorted((samples / "style").iterdir())[:3]
    for path in good:
        shutil.copy(path, styles / path.name)
    broken = styles / "broken.png"
    broken.write_bytes(good[0].read_bytes()[:200])  # truncated PNG
    out = tmp_path / "out"
    cfg = make_config(out, {"images": str(samples / "content")}, str(styles), pairing={"styles_per_content": 4})
    planned = {s.key for s in build_plan(cfg)}
    first = run(cfg, quiet=True)
    assert first.failed > 0
    failed = {r["key"] for r in read_index(str(out)) if r["status"] == "failed"}
    assert all("style" in r["reason"] for r in read_index(str(out)) if r["status"] == "failed")

    shutil.copy(good[0], broken)  # the input is fixed
    assert run(cfg, quiet=True).skipped == len(planned)  # a plain rerun does not retry
    nothing = run(cfg, quiet=True, retry_failed="no such reason")
    assert nothing.retried == 0 and nothing.skipped == len(planned)

    retried = run(cfg, quiet=True, retry_failed="style")
    assert retried.retried == len(failed)
    assert (retried.kept, retried.failed, retried.skipped) == (len(failed), 0, len(planned) - len(failed))
    rows = check_invariants(str(out), planned)  # exactly one row per key, shards == kept keys
    assert all(r["status"] == "kept" for r in rows)
    # Plain pyarrow over index/ sees one row per key; the superseded rows are kept aside.
    plain = pq.read_table(str(out / "index")).column("key").to_pylist()
    assert sorted(plain) == sorted(planned)
    old = [r for f in (out / "_superseded").rglob("*.parquet") for r in pq.read_table(f).to_pylist()]
    assert {r["key"] for r in old if r["status"] == "failed"} == failed
    assert _verify(out).returncode == 0


def test_retry_failed_in_filter_re_embeds_fixed_samples(ray_local, samples, tmp_path):
    import io
    import tarfile

    from pipeline.config import FilterRunConfig
    from pipeline.filter.run import curate

    images = sorted((samples / "content").iterdir())[:4]

    def write_tar(path: Path, broken: bool) -> None:
        with tarfile.open(path, "w") as tar:
            for i, image in enumerate(images):
                data = image.read_bytes()
                if broken and i == 0:
                    data = data[:100]
                for ext, payload in ((image.suffix.lstrip(".").lower(), data), ("txt", f"caption {i}".encode())):
                    info = tarfile.TarInfo(f"s{i}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))

    shard = tmp_path / "in.tar"
    write_tar(shard, broken=True)
    cfg = FilterRunConfig.model_validate({"input": {"shards": str(shard)}, "output": {"path": str(tmp_path / "f")},
                                          "scoring": {"clip_model": "tiny:clip"}})
    first = curate(cfg, quiet=True)
    assert (first.kept, first.failed) == (3, 1)
    write_tar(shard, broken=False)
    assert curate(cfg, quiet=True).skipped == 4
    again = curate(cfg, quiet=True, retry_failed="")
    assert (again.retried, again.kept, again.failed) == (1, 1, 0)
    rows = read_index(str(tmp_path / "f"))
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4 and all(r["status"] == "kept" for r in rows)
    emb = pq.read_table(str(tmp_path / "f" / "embeddings"), columns=["key", "error"]).to_pylist()
    assert len(emb) == 4 and not any(r["error"] for r in emb)


def test_quarantine_never_leaves_the_output(ray_local, samples, tmp_path):
    out, cfg, _ = _finished(tmp_path, samples)
    os.remove(_kept_shards(out)[0])
    before = set(os.listdir(tmp_path))
    run(cfg, quiet=True)
    assert set(os.listdir(tmp_path)) == before
