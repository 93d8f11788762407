"""`stylegen filter`: CLIP filtering of existing WebDataset shards, persisted embeddings, dedup, top fraction."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import FilterRunConfig, validate_config
from pipeline.filter.dedup import near_duplicates
from pipeline.filter.inputs import index_inputs, index_tars, list_inputs
from pipeline.filter.run import curate
from pipeline.filter.selection import top_fraction_keys
from tests.invariants import check_invariants, read_index

REPO = Path(__file__).resolve().parents[1]


def test_top_fraction_is_exact_and_breaks_ties_by_key():
    scores = {f"k{i}": float(i % 3) for i in range(9)}
    assert top_fraction_keys(scores, 0.5) == top_fraction_keys(dict(reversed(list(scores.items()))), 0.5)
    kept = top_fraction_keys(scores, 0.5)
    assert len(kept) == 5 and all(scores[k] >= 1.0 for k in kept)
    assert len(top_fraction_keys(scores, 1.0)) == 9 and len(top_fraction_keys(scores, 0.01)) == 0


@pytest.mark.parametrize("spelling", ["", "file://", "local://"])
def test_the_output_is_never_its_own_input_however_it_is_spelled(tmp_path, spelling):
    """``filter`` and ``run`` skip their own output folder when listing (``sources.output_exclusion``), also when
    the output is spelled ``file://`` or ``local://``."""
    corpus = tmp_path / "corpus"
    for rel in ("a.tar", "out/shards/0123456789abcdef.tar"):
        (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
        (corpus / rel).write_bytes(b"")
    cfg = validate_config({"input": {"shards": f"{corpus}/**/*.tar"}, "output": {"path": f"{spelling}{corpus}/out"}},
                          schema=FilterRunConfig)
    assert [url.rsplit("/", 1)[-1] for url, _ in list_inputs(cfg)] == ["a.tar"]


def test_near_duplicates_keeps_the_best_scored_twin():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 16)).astype(np.float32)
    emb = np.concatenate([base, base[:2] + 1e-4]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keys = ["a", "b", "c", "d", "a2", "b2"]
    scores = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.4, "a2": 0.3, "b2": 0.2}
    dropped = near_duplicates(keys, emb, scores, threshold=0.99)
    assert set(dropped) == {"a", "b2"}  # a2 outscores a; b outscores b2
    assert dropped["a"][0] == "a2" and dropped["b2"][0] == "b" and dropped["a"][1] > 0.99


def _shards(tmp: Path, samples: Path) -> list[Path]:
    """Three shards of image + caption; one duplicate image under another key; one tiny image."""
    images = sorted((samples / "content").iterdir()) + sorted((samples / "style").iterdir())[:9]
    prompts = [p.strip() for p in (samples / "prompts.txt").read_text().splitlines() if p.strip()]
    paths = []
    for shard in range(3):
        path = tmp / f"corpus-{shard}.tar"
        with tarfile.open(path, "w") as tar:
            members = [(f"s{shard}_{i:02d}", p.read_bytes(), p.suffix.lstrip(".").lower())
                       for i, p in enumerate(images[shard * 7:(shard + 1) * 7])]
            if shard == 2:
                members.append(("dup_of_first", images[0].read_bytes(), images[0].suffix.lstrip(".").lower()))
                buf = io.BytesIO()
                Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG")
                members.append(("tiny", buf.getvalue(), "png"))
            for n, (key, data, ext) in enumerate(members):
                for member_ext, payload in ((ext, data), ("txt", prompts[n % len(prompts)].encode()),
                                            ("json", json.dumps({"caption": prompts[n % len(prompts)]}).encode())):
                    info = tarfile.TarInfo(f"{key}.{member_ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def _cfg(tmp: Path, out: str, **filters) -> FilterRunConfig:
    emb = filters.pop("embeddings", None)
    return validate_config({
        "input": {"shards": str(tmp / "corpus-{0..2}.tar")},
        "output": {"path": str(tmp / out), "samples_per_shard": 4},
        "scoring": {"clip_model": "tiny:clip", "batch_size": 8},
        "filter": filters,
        **({"embeddings": {"path": emb}} if emb else {}),
    }, schema=FilterRunConfig)


def _original_members(tar_paths: list[Path]) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for path in tar_paths:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(f"{path.name}/{key}", {})[ext] = tar.extractfile(m).read()
    return out


@pytest.mark.slow
def test_filter_top_fraction_dedup_and_embedding_reuse(ray_local, samples, tmp_path, monkeypatch, caplog):
    tars = _shards(tmp_path, samples)
    cfg = _cfg(tmp_path, "half", top_fraction=0.5)
    plan = index_tars(list_inputs(cfg))
    assert len(plan) == 23
    monkeypatch.setenv("STYLEGEN_PROGRESS_S", "0.2")
    with caplog.at_level("INFO", logger="pipeline.output.progress"):
        summary = curate(cfg, quiet=False)
    assert (summary.planned, summary.failed) == (23, 0)
    # The progress lines count the embedding pass (no index row yet), then the written samples.
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.output.progress"]
    stages = [ln.split()[1] for ln in lines]
    assert stages[0] == "embedded" and stages[-1] == "written" and "embedded" not in stages[stages.index("written"):]
    assert all(re.match(r"progress: embedded \d+/23 \(", ln) for ln in lines if " embedded " in ln), lines
    assert lines[-1].startswith("progress: written 23/23 (100.0%)"), lines
    assert abs(summary.kept - 23 * 0.5) <= 1  # half, within one sample, across three shards
    rows = check_invariants(str(tmp_path / "half"), {p["key"] for p in plan})
    run_json = json.loads((tmp_path / "half" / "run.json").read_text())
    assert run_json["counters"] == {"clip_images_encoded": 23, "embeddings_reused": 0}
    kept_scores = [r["clip_content"] for r in rows if r["status"] == "kept"]
    rejected_scores = [r["clip_content"] for r in rows if r["status"] == "rejected"]
    assert min(kept_scores) >= max(rejected_scores)

    # Kept samples keep their original members and bytes.
    originals = _original_members(tars)
    by_key = {r["key"]: r for r in rows}
    for shard in (tmp_path / "half" / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            got: dict[str, dict[str, bytes]] = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                got.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, members in got.items():
            assert members == originals[by_key[key]["content_id"]]

    # Embeddings are persisted, keyed and L2-normalised.
    emb = pq.read_table(tmp_path / "half" / "embeddings").to_pylist()
    assert len(emb) == 23 and all(abs(np.linalg.norm(e["image_emb"]) - 1) < 1e-4 for e in emb)

    # Re-filter with another threshold into a new output, reusing the embeddings: no CLIP work at all.
    median = float(np.median([e["clip"] for e in emb]))
    cfg2 = _cfg(tmp_path, "minclip", min_clip=median, min_side=32, embeddings=str(tmp_path / "half" / "embeddings"))
    curate(cfg2, quiet=True)
    run2 = json.loads((tmp_path / "minclip" / "run.json").read_text())
    assert run2["counters"] == {"clip_images_encoded": 0, "embeddings_reused": 23}
    rows2 = {r["content_id"].split("/", 1)[1]: r for r in check_invariants(str(tmp_path / "minclip"),
                                                                           {p["key"] for p in plan})}
    assert "min side 16 < 32" in rows2["tiny"]["reason"]
    for r in rows2.values():
        if r["status"] == "kept":
            assert r["clip_content"] >= median
        elif r["content_id"].split("/", 1)[1] != "tiny":
            assert r["clip_content"] < median and "min_clip" in r["reason"]

    # Near-duplicate removal: the same image stored twice keeps exactly one copy (the better-captioned one).
    curate(_cfg(tmp_path, "dedup", dedup_threshold=0.999999, embeddings=str(tmp_path / "half" / "embeddings")),
           quiet=True)
    rows3 = {r["content_id"].split("/", 1)[1]: r for r in read_index(str(tmp_path / "dedup"))}
    pair = sorted((rows3["s0_00"], rows3["dup_of_first"]), key=lambda r: -r["clip_content"])
    assert pair[0]["status"] == "kept" and pair[1]["status"] == "rejected"
    assert pair[1]["reason"].startswith(f"near-duplicate of {pair[0]['key']}")
    # The shared samples hold one more byte-identical pair (content/12.jpg == content/27032.jpg): two drops.
    rejected = [r for r in rows3.values() if r["status"] == "rejected"]
    assert len(rejected) == 2
    kept_keys = {r["key"] for r in rows3.values() if r["status"] == "kept"}
    assert all(r["reason"].split()[2] in kept_keys for r in rejected)
    removed = json.loads((tmp_path / "dedup" / "run.json").read_text())["removed_by"]
    assert removed["near_duplicate"] == 2 and sum(removed.values()) == 2

    # Exact dedup: byte-identical images (sha1 recorded at embedding) keep the best-scored one, no CLIP work.
    curate(_cfg(tmp_path, "exact", dedup_exact=True, embeddings=str(tmp_path / "half" / "embeddings")), quiet=True)
    rows4 = {r["content_id"].split("/", 1)[1]: r for r in read_index(str(tmp_path / "exact"))}
    exact = sorted(r["content_id"] for r in rows4.values() if r["status"] == "rejected")
    assert exact == sorted(r["content_id"] for r in rejected)  # the same two pairs as the semantic rule
    for r in rows4.values():
        if r["status"] == "rejected":
            twin = next(t for t in rows4.values() if t["key"] == r["reason"].split()[3])
            assert r["reason"].startswith("exact duplicate of ") and twin["status"] == "kept"
            assert (-twin["clip_content"], twin["key"]) < (-r["clip_content"], r["key"])  # the better-ranked
    run4 = json.loads((tmp_path / "exact" / "run.json").read_text())
    assert run4["removed_by"]["exact_duplicate"] == 2 and run4["counters"]["clip_images_encoded"] == 0

    # Rerun: nothing to do. Changing the filters on the same output is refused with a clear error.
    assert curate(cfg, quiet=True).skipped == 23
    config = tmp_path / "f.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json") | {"filter": {"top_fraction": 0.25}}))
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "filter", str(config), "-q"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "other settings" in proc.stderr, proc.stderr
    assert len(read_index(str(tmp_path / "half"))) == 23


def test_input_tars_are_indexed_by_ray_tasks(ray_local, samples, tmp_path):
    from pipeline.io.sources import SourceError

    _shards(tmp_path, samples)
    jobs = list_inputs(_cfg(tmp_path, "out"))
    listing = index_inputs(jobs)
    assert listing.num_blocks() == 3  # a task per tar
    on_ray = sorted(listing.take_all(), key=lambda r: r["key"])
    assert on_ray == sorted(index_tars(jobs), key=lambda r: r["key"])  # the rows of indexing in this process
    (tmp_path / "corpus-1.tar").write_bytes(b"not a tar" * 300)
    with pytest.raises(SourceError, match=r"^input.shards: cannot read .*corpus-1.tar \(ReadError"):
        index_inputs(jobs)


HEADS = {"aesthetic": {"weights": "tiny"}, "nsfw": {"weights": "tiny"}}


def _heads_cfg(tmp: Path, out: str, **filters) -> FilterRunConfig:
    emb = filters.pop("embeddings", None)
    return validate_config({
        "input": {"shards": str(tmp / "corpus-{0..2}.tar")},
        "output": {"path": str(tmp / out), "samples_per_shard": 4},
        "scoring": {"clip_model": "tiny:clip", "batch_size": 8, "heads": HEADS},
        "filter": filters,
        **({"embeddings": {"path": emb}} if emb else {}),
    }, schema=FilterRunConfig)


@pytest.mark.slow
def test_filter_quality_heads_from_persisted_embeddings(ray_local, samples, tmp_path, monkeypatch):
    from pipeline.filter import decide as curate_decide
    from pipeline.output.store import OutputStore

    _shards(tmp_path, samples)
    curate(_heads_cfg(tmp_path, "scored"), quiet=True)
    rows = read_index(str(tmp_path / "scored"))
    assert len(rows) == 23 and all(np.isfinite(r["score_aesthetic"]) and 0 <= r["score_nsfw"] <= 1 for r in rows)
    emb = pq.read_table(tmp_path / "scored" / "embeddings").to_pylist()
    persisted = {e["key"]: json.loads(e["scores"]) for e in emb}  # stored with the embeddings
    assert all(persisted[r["key"]]["aesthetic"] == pytest.approx(r["score_aesthetic"], abs=1e-5) for r in rows)

    # Re-filter through the persisted embeddings with a head threshold at the median: half kept, no CLIP work.
    median = float(np.median([r["score_aesthetic"] for r in rows]))
    store = str(tmp_path / "scored" / "embeddings")
    cfg = _heads_cfg(tmp_path, "median", min_scores={"aesthetic": median}, embeddings=store)
    summary = curate(cfg, quiet=True)
    run_json = json.loads((tmp_path / "median" / "run.json").read_text())
    assert run_json["counters"] == {"clip_images_encoded": 0, "embeddings_reused": 23}
    assert summary.kept == 12 and run_json["removed_by"]["scores"] == 11  # 23 distinct scores: the median is one
    got = {r["key"]: r for r in check_invariants(str(tmp_path / "median"), {r["key"] for r in rows})}
    for r in got.values():
        assert (r["status"] == "kept") == (r["score_aesthetic"] >= median)
        if r["status"] == "rejected":
            assert r["reason"].startswith("score_aesthetic ") and f"< min_scores.aesthetic {median}" in r["reason"]

    # The staged path (pools over SMALL_POOL) applies the same rules: the same decisions and scores.
    monkeypatch.setattr(curate_decide, "SMALL_POOL", 0)
    both = {"min_scores": {"aesthetic": median}, "max_scores": {"nsfw": float(np.median([r["score_nsfw"]
                                                                                        for r in rows]))}}
    one_cfg = _heads_cfg(tmp_path, "x", embeddings=store, **both)
    plan = index_inputs(list_inputs(one_cfg))
    staged = curate_decide.decisions_dataset(plan, 23, OutputStore(store), one_cfg.filter.model_dump(),
                                             one_cfg.scoring.heads_dump()).take_all()
    monkeypatch.setattr(curate_decide, "SMALL_POOL", 10**9)
    whole = curate_decide.decisions_dataset(plan, 23, OutputStore(store), one_cfg.filter.model_dump(),
                                            one_cfg.scoring.heads_dump()).take_all()

    def by_key(decided):
        return {r["key"]: (r["status"], r["reason"], r["clip_content"], json.loads(r["scores"] or "null"))
                for r in decided}

    assert by_key(staged) == by_key(whole)
    assert any("max_scores.nsfw" in (r["reason"] or "") for r in whole)
