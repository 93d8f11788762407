"""`stylegen filter` decided on the cluster: the staged decisions (join, groupby, distributed sort) equal the
one-worker rule, and the driver never reads embeddings, tars or the index's keys."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import FilterRunConfig, validate_config
from pipeline.filter import decide as curate_decide
from pipeline.filter import dedup
from pipeline.filter import inputs as filter_inputs
from pipeline.filter.decide import decide, decisions_dataset
from pipeline.filter.inputs import index_inputs, index_tars, list_inputs
from pipeline.filter.run import curate
from pipeline.output.store import OutputStore
from tests.invariants import check_invariants, read_index
from tests.unit_helpers import png_bytes, wds_tar

WORDS = ["a red fox", "an old map", "two cats", "a blue door", "a tall tower", "sea waves", "dry leaves", "x"]


def _corpus(root: Path) -> int:
    """Four tars: 48 noise images, 8 byte-identical copies, 8 copies with one pixel changed, one tiny image and
    one undecodable payload; captions of varied length (scores spread, a few rejected by caption length)."""
    gen = torch.Generator().manual_seed(7)
    images = [torch.randint(0, 256, (24, 24, 3), generator=gen, dtype=torch.uint8).numpy() for _ in range(48)]
    payloads = [png_bytes(Image.fromarray(im)) for im in images]
    for i in range(8):
        payloads.append(payloads[i * 3])  # exact copies
        near = images[i * 5 + 1].copy()
        near[0, 0] = 255 - near[0, 0]
        payloads.append(png_bytes(Image.fromarray(near)))  # near copies
    payloads.append(png_bytes(Image.new("RGB", (6, 6), (1, 2, 3))))
    payloads.append(b"\x89PNG broken")
    samples = [{"png": data, "txt": WORDS[i % len(WORDS)].encode()} for i, data in enumerate(payloads)]
    root.mkdir()
    for t in range(4):
        wds_tar(root / f"part-{t}.tar", {f"s{i:03d}": s for i, s in enumerate(samples) if i % 4 == t})
    return len(samples)


def _cfg(tmp: Path, out: str, **filters) -> FilterRunConfig:
    return validate_config({
        "input": {"shards": str(tmp / "corpus" / "part-*.tar")},
        "output": {"path": str(tmp / out), "samples_per_shard": 8},
        "scoring": {"clip_model": "tiny:clip", "batch_size": 16},
        "embeddings": {"path": str(tmp / "embeddings")},
        "filter": {"min_side": 8, "min_caption_chars": 2, "dedup_exact": True, "dedup_threshold": 0.995,
                   "top_fraction": 0.7} | filters,
    }, schema=FilterRunConfig)


def _reference(cfg: FilterRunConfig) -> dict[str, tuple]:
    """:func:`decide` in this process over every planned key (the whole pool in memory, as before issue 14)."""
    keys = [r["key"] for r in index_tars(list_inputs(cfg))]
    emb = OutputStore(cfg.embeddings_path()).read_tables(".", None)
    return decide(keys, emb, cfg.filter)


def _decided(rows) -> dict[str, tuple]:
    return {r["key"]: (r["status"], r["reason"], r["clip_content"]) for r in rows}


@contextlib.contextmanager
def driver_reads_no_samples(tmp: Path):
    """Fail, in this (the driver's) process, any read of embeddings or the index's keys, and any tar indexing."""
    real = pq.read_table

    def guarded(source, *args, columns=None, **kwargs):
        name = str(getattr(source, "path", None) or getattr(source, "name", None) or source)
        if "embeddings" in name or ("/index/" in name and (columns is None or "key" in columns)):
            raise AssertionError(f"the driver read {name} ({columns})")
        return real(source, *args, columns=columns, **kwargs)

    def no_tars(*args, **kwargs):
        raise AssertionError("the driver indexed a tar")

    pq.read_table, index_tar = guarded, filter_inputs.index_tar
    filter_inputs.index_tar = no_tars
    try:
        yield
    finally:
        pq.read_table, filter_inputs.index_tar = real, index_tar


@pytest.mark.slow
def test_staged_decisions_equal_the_one_worker_rule(ray_local, tmp_path, monkeypatch):
    n = _corpus(tmp_path / "corpus")
    cfg = _cfg(tmp_path, "one")
    with driver_reads_no_samples(tmp_path):
        curate(cfg, quiet=True)  # embeds, then decides in one worker (a pool under SMALL_POOL)
    one = _decided(check_invariants(str(tmp_path / "one"), set(_reference(cfg))))
    assert len(one) == n
    reference = _reference(cfg)
    assert one == reference
    assert reference == _reference(_cfg(tmp_path, "g", dedup_method="greedy"))  # one cluster: the exact rule
    reasons = " ".join(r for _, r, _ in one.values() if r)
    for rule in ("exact duplicate of", "near-duplicate of", "not in top_fraction", "min side 6 < 8", "caption 1",
                 "image:"):
        assert rule in reasons  # every rule decided something on this corpus

    # The same pool decided in stages across the cluster: one cluster (the exact rule), then several.
    monkeypatch.setattr(curate_decide, "SMALL_POOL", 0)
    with driver_reads_no_samples(tmp_path):
        summary = curate(_cfg(tmp_path, "staged"), quiet=True)
    assert summary.planned == n and json.loads((tmp_path / "staged" / "run.json").read_text())["counters"] == {
        "clip_images_encoded": 0, "embeddings_reused": n}
    assert _decided(read_index(str(tmp_path / "staged"))) == reference
    assert json.loads((tmp_path / "staged" / "run.json").read_text())["removed_by"] == json.loads(
        (tmp_path / "one" / "run.json").read_text())["removed_by"]

    # A run that stopped after some shards resumes with the same decisions (the rest decided in stages).
    shutil.copytree(tmp_path / "one", tmp_path / "resumed")
    dropped = 0
    for path in sorted((tmp_path / "resumed" / "index").glob("*.parquet"))[::2]:
        dropped += pq.read_metadata(path).num_rows
        (tmp_path / "resumed" / "shards" / f"{path.stem}.tar").unlink(missing_ok=True)
        path.unlink()
    summary = curate(_cfg(tmp_path, "resumed"), quiet=True)
    assert (summary.skipped, summary.kept + summary.rejected + summary.failed) == (n - dropped, dropped) != (n, 0)
    assert _decided(check_invariants(str(tmp_path / "resumed"), set(reference))) == reference

    monkeypatch.setattr(dedup, "CLUSTER_SIZE", 12)  # about five k-means clusters of the ~50 candidates
    clustered = _cfg(tmp_path, "clusters")
    plan = index_inputs(list_inputs(clustered))
    staged = decisions_dataset(plan, n, OutputStore(clustered.embeddings_path()), clustered.filter.model_dump())
    staged = staged.materialize()
    stats = staged.stats()
    for stage in ("JoinShuffleReduce", "MapBatches(_exact_bucket)", "MapBatches(_near_group)", "MapBatches(_cut)"):
        assert stage in stats  # decided in stages across the cluster, not by one worker
    got = _decided(staged.take_all())
    expected = _reference(clustered)  # decide() in this process, with the same cluster count
    assert got == expected
    near = {k for k, (_, r, _) in got.items() if r and r.startswith("near-duplicate")}
    assert near == {k for k, (_, r, _) in reference.items() if r and r.startswith("near-duplicate")}, "recall"
    assert len(near) >= 5


@pytest.mark.slow
def test_staged_top_fraction_cut_is_exact_with_ties(ray_local, tmp_path, monkeypatch):
    """Equal scores at the cut-off are ranked by key, as the one-worker rule does."""
    root = tmp_path / "corpus"
    root.mkdir()
    one = png_bytes(Image.new("RGB", (16, 16), (10, 200, 30)))
    other = png_bytes(Image.new("RGB", (16, 16), (200, 10, 90)))
    # Identical image and caption: identical CLIP scores, so the cut falls inside a tie group.
    wds_tar(root / "part-0.tar", {f"t{i:02d}": {"png": one if i % 3 else other, "txt": b"a plain square"}
                                  for i in range(21)})
    cfg = validate_config({
        "input": {"shards": str(root / "part-*.tar")}, "output": {"path": str(tmp_path / "out")},
        "scoring": {"clip_model": "tiny:clip"}, "embeddings": {"path": str(tmp_path / "embeddings")},
        "filter": {"top_fraction": 0.5}}, schema=FilterRunConfig)
    curate(cfg, quiet=True)
    reference = _reference(cfg)
    assert _decided(read_index(str(tmp_path / "out"))) == reference
    assert sum(s == "kept" for s, _, _ in reference.values()) == 11  # round(0.5 * 21)
    monkeypatch.setattr(curate_decide, "SMALL_POOL", 0)
    plan = index_inputs(list_inputs(cfg))
    got = _decided(decisions_dataset(plan, 21, OutputStore(cfg.embeddings_path()), cfg.filter.model_dump())
                   .take_all())
    assert got == reference
    clips = np.array([c for _, _, c in got.values()])
    assert len(np.unique(clips)) == 2  # two tie groups: the cut is decided by key inside one
