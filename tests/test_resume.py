"""The resume on the cluster: planned samples already in the index are skipped and counted without the driver
reading a single key of the index, with the small-index lookup on workers and with Ray's hash join alike."""

from __future__ import annotations

import contextlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.generate.run import run
from pipeline.output import integrity as integrity
from pipeline.output import resume
from pipeline.plan.keys import build_plan
from pipeline.schema import INDEX_SCHEMA
from tests.invariants import check_invariants
from tests.test_run import make_config

pytestmark = pytest.mark.slow


def _prefill(out, keys: list[str], per_file: int) -> None:
    """Index files holding ``keys`` as rejected rows (no shard), as an earlier run would have left them."""
    (out / "index").mkdir(parents=True)
    for i in range(0, len(keys), per_file):
        part = keys[i:i + per_file]
        cols = {f.name: pa.nulls(len(part), f.type) for f in INDEX_SCHEMA}
        cols["key"] = pa.array(part, pa.string())
        cols["status"] = pa.array(["rejected"] * len(part), pa.string())
        cols["reason"] = pa.array(["clip_style below 0.9"] * len(part), pa.string())
        pq.write_table(pa.table(cols, schema=INDEX_SCHEMA), out / "index" / f"{i:016x}.parquet")


@contextlib.contextmanager
def driver_reads_no_index_keys():
    """Fail any read of the index's key column in this (the driver's) process while the block runs."""
    real = pq.read_table

    def guarded(source, *args, columns=None, **kwargs):
        name = getattr(source, "path", None) or getattr(source, "name", None) or str(source)
        if "/index/" in str(name) and (columns is None or "key" in columns):
            raise AssertionError(f"the driver read the keys of {name}")
        return real(source, *args, columns=columns, **kwargs)

    pq.read_table = guarded
    try:
        yield
    finally:
        pq.read_table = real


@pytest.mark.parametrize("way", ["lookup", "join"])
def test_resume_skips_and_counts_done_keys_on_the_cluster(ray_local, samples, tmp_path, monkeypatch, way):
    if way == "join":
        monkeypatch.setattr(resume, "BROADCAST_KEYS", 0)
        monkeypatch.setattr(integrity, "SMALL_INDEX", 1)
    out = tmp_path / "out"
    cfg = make_config(out, {"images": str(samples / "content")}, str(samples / "style"),
                      pairing={"styles_per_content": 3, "limit": 40})
    plan = [s.key for s in build_plan(cfg)]
    assert len(plan) == 40
    done = plan[::10] + plan[1::10] + plan[2::10] + plan[3::10] + plan[4::10] + plan[5::10] + plan[6::10] \
        + plan[7::10] + plan[8::10]  # 90% of the keys, spread over the plan
    _prefill(out, sorted(done), per_file=4)
    with driver_reads_no_index_keys():
        summary = run(cfg, quiet=True)
    assert (summary.planned, summary.skipped, summary.kept + summary.rejected + summary.failed) == (40, 36, 4)
    rows = check_invariants(str(out), set(plan))
    assert {r["key"] for r in rows if r["status"] == "kept"} == set(plan) - set(done)
    dataset = json.loads((out / "run.json").read_text())["dataset"]
    assert dataset["planned"] == 40 and dataset["rejected"] == 36 + summary.rejected and dataset["complete"]


def test_a_key_repeated_across_index_files_is_found_by_the_cluster(ray_local, tmp_path, monkeypatch):
    from pipeline.output.store import OutputStore

    monkeypatch.setattr(integrity, "SMALL_INDEX", 1)  # the groupby, not one worker
    out = tmp_path / "out"
    _prefill(out, ["a", "b", "c", "d", "b", "e", "f", "a"], per_file=2)  # files 0..3: ab cd be fa
    with driver_reads_no_index_keys():
        found = integrity.check(OutputStore(str(out)), deep=False)
    problems = {p.path.rsplit("/", 1)[-1]: p.what for p in found}
    assert set(problems) == {"0000000000000004.parquet", "0000000000000006.parquet"}
    assert problems["0000000000000004.parquet"].startswith("1 keys are indexed twice, e.g. b (also in ")


def test_plan_command_counts_todo_and_writes_the_plan_read_only(samples, tmp_path):
    import subprocess
    import sys

    from pipeline.config import load_config

    out, plan_dir = tmp_path / "out", tmp_path / "plan"
    sets = [f"output.path={out}", f"content.images={samples / 'content'}", "content.prompts=null",
            f"style.images={samples / 'style'}", "pairing.styles_per_content=2"]
    reference = build_plan(load_config("configs/demo.yaml", sets))
    _prefill(out, sorted(s.key for s in reference[::3]), per_file=5)
    before = sorted(p.name for p in out.rglob("*"))
    args = [sys.executable, "-m", "jobs.cli", "plan", "configs/demo.yaml", "--quiet", "--out", str(plan_dir)]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    done = len(reference[::3])
    assert proc.stdout.strip().splitlines()[-1] == f"planned={len(reference)} todo={len(reference) - done}"
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing written under the output, no lease
    table = pq.read_table(plan_dir).sort_by("ordinal")
    assert table.column("ordinal").to_pylist() == list(range(len(reference)))
    assert table.drop(["ordinal"]).to_pylist() == [s.to_row() for s in reference]
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.strip().endswith(f"--out: {plan_dir} exists; give a new folder")


def test_plan_command_writes_the_plan_to_s3(samples, s3_env):
    import subprocess
    import sys

    fs, bucket = s3_env["fs"], s3_env["bucket"]
    args = [sys.executable, "-m", "jobs.cli", "plan", "configs/demo.yaml", "--quiet", "--out", f"s3://{bucket}/plan",
            "--set", f"output.path=s3://{bucket}/out", "--set", f"style.images={samples / 'style'}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    planned = int(proc.stdout.strip().splitlines()[-1].split()[0].split("=")[1])
    files = fs.glob(f"{bucket}/plan/*.parquet")
    assert files and sum(pq.read_table(fs.open(f, "rb")).num_rows for f in files) == planned > 0
    assert not fs.exists(f"{bucket}/out")  # read-only for the output
