"""The decisions of ``stylegen filter`` (its second pass) as Ray Data work: the driver holds counts, never samples.

Every planned sample gets (status, reason, clip): failed inputs, basic checks and ``min_clip`` row by row, then,
over the whole pool, exact duplicates, near-duplicates and ``top_fraction``. Two ways, one answer:

- A pool of at most ``SMALL_POOL`` samples, and every ``dedup_method: greedy`` pool (its exact rule needs all
  embeddings in one place), is decided by :func:`decide` in one worker, which reads the embeddings itself.
- A larger pool is decided in stages across the cluster: a hash join of the plan with the embeddings, the per-row
  checks as a map, exact duplicates grouped by image hash, near-duplicates grouped by k-means cluster (centroids
  trained in one task on a key-hashed sample, see ``pipeline.filter.dedup``), and the ``top_fraction`` cut-off as the
  exact rank in a distributed sort, ties broken by key.

The output rows are the plan's (key, content_id, url, members) with status, reason, clip_content, prompt, meta.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import posixpath
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.filter.dedup import (
    TRAIN_PER_CLUSTER,
    cluster_count,
    clustered_near_duplicates,
    exact_duplicates,
    near_duplicates,
    nearest_centroid,
    train_centroids,
    training_mask,
)
from pipeline.filter.selection import Candidate, basic_reason, top_fraction_keys
from pipeline.output.store import OutputStore

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger(__name__)

SMALL_POOL = 100_000  # planned samples decided by one worker (embeddings of 10^5 ViT-L/14 images: ~300 MB)
PLAN_COLUMNS = ["key", "content_id", "url", "members"]
DECIDED = pa.schema([("key", pa.string()), ("content_id", pa.string()), ("url", pa.string()),
                     ("members", pa.string()), ("status", pa.string()), ("reason", pa.string()),
                     ("clip_content", pa.float64()), ("prompt", pa.string()), ("meta", pa.string()),
                     ("scores", pa.string())])  # JSON {head: score} (index columns score_<head>); null without heads
SEED = 0

Decision = tuple[str, str | None, float | None]  # (status, reason, clip score)


def decisions_dataset(plan: Dataset, planned: int, emb_store: OutputStore, rules: dict[str, Any],
                      heads: dict[str, dict] | None = None) -> Dataset:
    """The plan's rows with their decisions (schema ``DECIDED``), computed on the cluster. ``heads``
    (scoring.heads) are scored from the persisted image embeddings where the rows are decided."""
    from pipeline.config import FilterRules

    f = FilterRules.model_validate(rules)
    files = emb_store.parquet_files(".")
    heads = heads or {}
    if planned <= SMALL_POOL or (f.dedup_threshold is not None and f.dedup_method == "greedy"):
        return plan.repartition(1).map_batches(_decide_whole, batch_format="pyarrow", batch_size=None, fn_kwargs={
            "url": emb_store.url, "files": tuple(files), "rules": f.model_dump(), "heads": heads})
    return _staged(plan, planned, emb_store, files, f, heads)


# ---- quality heads, from the persisted embeddings -------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _head_set(heads_json: str, dim: int):
    from operators.heads import HeadSet

    return HeadSet(json.loads(heads_json), dim)


def head_scores(heads: dict[str, dict], rows: list[np.ndarray | None]) -> list[dict[str, float] | None]:
    """``{head: score}`` per embedding (None where a row has none, or no heads are configured)."""
    present = [i for i, r in enumerate(rows) if r is not None]
    out: list[dict[str, float] | None] = [None] * len(rows)
    if not heads or not present:
        return out
    import torch

    mat = torch.from_numpy(np.stack([rows[i] for i in present]).astype(np.float32, copy=False))
    for i, scores in zip(present, _head_set(json.dumps(heads, sort_keys=True), mat.shape[1]).rows(mat), strict=True):
        out[i] = scores
    return out


def _scores_json(scores: list[dict[str, float] | None]) -> list[str | None]:
    return [json.dumps(s, sort_keys=True) if s is not None else None for s in scores]


# ---- one worker: the reference rule ---------------------------------------------------------------------
def decide(keys: list[str], emb: pa.Table, f, heads: dict[str, dict[str, float] | None] | None = None,
           ) -> dict[str, Decision]:
    """key -> (status, reason, clip) for every key of ``keys`` (all in ``emb``), the whole pool in memory;
    ``heads``: key -> its quality-head scores (see :func:`head_scores`)."""
    heads = heads or {}
    by_key = {k: i for i, k in enumerate(emb.column("key").to_pylist())}
    clip_col = emb.column("clip").to_pylist()
    decisions: dict[str, Decision] = {}
    candidates: list[str] = []
    scores: dict[str, float] = {}
    for key in keys:
        i = by_key[key]
        rec = Candidate(key, clip_col[i], emb["width"][i].as_py(), emb["height"][i].as_py(),
                        len(emb["caption"][i].as_py() or ""), emb["error"][i].as_py())
        if rec.error:
            decisions[key] = ("failed", rec.error, None)
            continue
        if _finite(rec.clip):
            scores[key] = rec.clip
        reason = _row_reason(rec, f, heads.get(key))
        decisions[key] = ("rejected", reason, rec.clip) if reason else ("kept", None, rec.clip)
        if not reason:
            candidates.append(key)
    if f.dedup_exact and candidates:
        candidates = _exact_duplicates(candidates, emb, by_key, scores, decisions)
    if f.dedup_threshold is not None and candidates:
        idx = [by_key[k] for k in candidates]
        mat = np.asarray(emb.column("image_emb").take(pa.array(idx)).to_pylist(), dtype=np.float32)
        if f.dedup_method == "clustered":
            dropped = clustered_near_duplicates(candidates, mat, scores, f.dedup_threshold, seed=SEED)
        else:
            dropped = near_duplicates(candidates, mat, scores, f.dedup_threshold)
        for key, (twin, cos) in dropped.items():
            decisions[key] = ("rejected", _near_reason(twin, cos), scores.get(key))
    if f.top_fraction is not None:
        best = top_fraction_keys(scores, f.top_fraction)
        for key, (status, _, clip) in decisions.items():
            if status == "kept" and key not in best:
                decisions[key] = ("rejected", _top_reason(f.top_fraction), clip)
    return decisions


def _row_reason(rec: Candidate, f, scores: dict[str, float] | None = None) -> str | None:
    """The per-row rules of both paths: basic checks, ``min_clip``, then ``min_scores``/``max_scores``."""
    from pipeline.score_rules import score_reasons

    reason = basic_reason(rec, min_side=f.min_side, max_aspect=f.max_aspect,
                          min_caption_chars=f.min_caption_chars, max_caption_chars=f.max_caption_chars)
    if reason is None and f.min_clip is not None and (rec.clip is None or rec.clip < f.min_clip):
        reason = "no caption to score" if rec.clip is None else f"clip {rec.clip:.4f} < min_clip {f.min_clip}"
    if reason is None:
        reason = "; ".join(score_reasons(scores, f.min_scores, f.max_scores)) or None
    return reason


def _exact_reason(twin: str, digest: str) -> str:
    return f"exact duplicate of {twin} (sha1 {digest[:12]})"


def _near_reason(twin: str, cos: float) -> str:
    return f"near-duplicate of {twin} (cosine {cos:.4f})"


def _top_reason(fraction: float) -> str:
    return f"not in top_fraction {fraction} of the pool"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _exact_duplicates(candidates: list[str], emb: pa.Table, by_key: dict[str, int], scores: dict[str, float],
                      decisions: dict[str, Decision]) -> list[str]:
    """Reject all but the best-scored (ties by key) of each group of byte-identical images; return the rest."""
    column = emb.column("sha1").to_pylist()
    hashes = {k: column[by_key[k]] for k in candidates}
    _warn_unhashed(sum(h is None for h in hashes.values()))
    for key, twin in exact_duplicates(candidates, [hashes[k] for k in candidates], scores).items():
        decisions[key] = ("rejected", _exact_reason(twin, hashes[key]), decisions[key][2])
    return [k for k in candidates if decisions[k][0] == "kept"]


def _warn_unhashed(unhashed: int) -> None:
    if unhashed:
        log.warning("dedup_exact: %d samples were embedded before image hashes were recorded; they are not "
                    "checked (re-embed with a new embeddings.path to include them)", unhashed)


def _read_embeddings(url: str, files: tuple[str, ...], keys: pa.Array) -> pa.Table:
    """The rows of ``keys`` from the embeddings store, read in this worker (conformed to ``EMB_SCHEMA``)."""
    store = OutputStore(url)
    parts = []
    for path in files:
        table = _conform_emb(store.read_parquet(path))
        parts.append(table.filter(pc.fill_null(pc.is_in(table.column("key"), keys), False)))
    from pipeline.schema import EMB_SCHEMA

    return pa.concat_tables(parts) if parts else EMB_SCHEMA.empty_table()


def _conform_emb(table: pa.Table) -> pa.Table:
    from pipeline.schema import EMB_SCHEMA

    for field in EMB_SCHEMA:  # files embedded before a column existed (sha1) hold nulls for it
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(EMB_SCHEMA.names).cast(EMB_SCHEMA)


def _decide_whole(batch: pa.Table, url: str, files: tuple[str, ...], rules: dict[str, Any],
                  heads: dict[str, dict] | None = None) -> pa.Table:
    from pipeline.config import FilterRules

    keys = batch.column("key").to_pylist()
    emb = _read_embeddings(url, files, batch.column("key"))
    emb_keys = emb.column("key").to_pylist()
    vectors = [np.asarray(v, dtype=np.float32) if v is not None else None for v in emb.column("image_emb").to_pylist()]
    scores = dict(zip(emb_keys, head_scores(heads or {}, vectors), strict=True))
    decisions = decide(keys, emb, FilterRules.model_validate(rules), scores)
    captions = dict(zip(emb_keys, emb.column("caption").to_pylist(), strict=True))
    status, reason, clip = zip(*(decisions[k] for k in keys), strict=True) if keys else ((), (), ())
    return _decided(batch, list(status), list(reason), list(clip), [captions.get(k) for k in keys],
                    _scores_json([scores.get(k) if s != "failed" else None for k, s in zip(keys, status, strict=True)]))


def _meta(url: str, members: str) -> str:
    """A row's ``meta``: the source tar, its members, and (when any) the members a kept copy drops
    (``pipeline.io.members.kept_members``); foreign names are cut to a bounded length."""
    from pipeline.io.members import kept_members, shown

    names = json.loads(members)
    meta = {"source": posixpath.basename(url), "members": [shown(e) for e in sorted(names)]}
    dropped = kept_members(names)[1]
    if dropped:
        meta["dropped"] = [shown(e) for e in dropped]
    return json.dumps(meta)


def _decided(batch: pa.Table, status: list, reason: list, clip: list, prompt: list, scores: list) -> pa.Table:
    meta = [_meta(u, m) for u, m in zip(batch.column("url").to_pylist(), batch.column("members").to_pylist(),
                                        strict=True)]
    columns = [batch.column(c) for c in PLAN_COLUMNS] + [
        pa.array(status, pa.string()), pa.array(reason, pa.string()), pa.array(clip, pa.float64()),
        pa.array(prompt, pa.string()), pa.array(meta, pa.string()), pa.array(scores, pa.string())]
    return pa.Table.from_arrays(columns, schema=DECIDED)


# ---- across the cluster -----------------------------------------------------------------------------------
def _partitions(planned: int) -> int:
    return max(4, min(512, planned // 50_000))


def _staged(plan: Dataset, planned: int, emb_store: OutputStore, files: list[str], f, heads: dict) -> Dataset:
    import ray

    from pipeline.io.fs import arrow_fs

    parts = _partitions(planned)
    emb = ray.data.read_parquet(files, filesystem=arrow_fs(emb_store.fs)).map_batches(
        _for_join, batch_format="pyarrow")
    # The listing's own error column is superseded by the embedding's (the embedder copies it there).
    joined = plan.join(emb, "inner", num_partitions=parts, on=("key",), left_suffix="_listing")
    rows = joined.map_batches(_row_checks, batch_format="pyarrow",
                              fn_kwargs={"rules": f.model_dump(), "heads": heads}).materialize()
    if f.dedup_exact:
        rows = _exact_stage(rows, parts)
    if f.dedup_threshold is not None:
        rows = _near_stage(rows, parts, f.dedup_threshold)
    if f.top_fraction is not None:
        rows = _top_stage(rows, f.top_fraction)
    return rows.map_batches(_finish, batch_format="pyarrow")


# Columns carried between the stages, besides DECIDED's: whether the sample is in the scored pool, its image hash,
# and its image embedding as raw float32 bytes (a binary column moves through Ray's object store far faster than
# a list<float> one).
WORK = ["scored", "sha1", "emb"]


def _emb_bytes(column: pa.ChunkedArray) -> pa.Array:
    lists = column.combine_chunks()
    valid = lists.is_valid().to_numpy(zero_copy_only=False)
    flat = lists.flatten().to_numpy().astype(np.float32, copy=False)
    rows = iter(flat.reshape(int(valid.sum()), -1) if valid.any() else ())
    return pa.array([next(rows).tobytes() if ok else None for ok in valid], pa.binary())


def _for_join(table: pa.Table) -> pa.Table:
    """An embeddings block as the stages carry it: no caption embedding, the image embedding as bytes."""
    table = _conform_emb(table).drop_columns(["text_emb", "scores"])
    emb = _emb_bytes(table.column("image_emb"))
    return table.drop_columns(["image_emb"]).append_column("emb", emb).combine_chunks()


def _matrix(table: pa.Table) -> np.ndarray:
    """The ``emb`` column as an (n, d) float32 matrix."""
    blobs = table.column("emb").to_pylist()
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1)


def _row_checks(batch: pa.Table, rules: dict[str, Any], heads: dict[str, dict] | None = None) -> pa.Table:
    """Failed inputs, basic checks, ``min_clip`` and the head scores, row by row (what :func:`decide` does
    first)."""
    from pipeline.config import FilterRules

    f = FilterRules.model_validate(rules)
    status, reason, scored = [], [], []
    blobs = batch.column("emb").to_pylist()
    vectors = [np.frombuffer(b, dtype=np.float32) if b is not None else None for b in blobs]
    head_rows = head_scores(heads or {}, vectors)
    for row, h in zip(batch.select(["key", "clip", "width", "height", "caption", "error"]).to_pylist(), head_rows,
                      strict=True):
        rec = Candidate(row["key"], row["clip"], row["width"], row["height"], len(row["caption"] or ""), row["error"])
        if rec.error:
            status.append("failed"), reason.append(rec.error), scored.append(False)
            continue
        why = _row_reason(rec, f, h)
        status.append("rejected" if why else "kept"), reason.append(why), scored.append(_finite(rec.clip))
    failed = pc.equal(pa.array(status, pa.string()), "failed")
    clip = pc.if_else(failed, pa.nulls(batch.num_rows, pa.float64()), batch.column("clip"))
    failed_rows = failed.to_pylist()
    out = _decided(batch, status, reason, clip.to_pylist(), batch.column("caption").to_pylist(),
                   _scores_json([None if bad else h for h, bad in zip(head_rows, failed_rows, strict=True)]))
    return out.append_column("scored", pa.array(scored, pa.bool_())).append_column(
        "sha1", batch.column("sha1")).append_column("emb", batch.column("emb")).combine_chunks()


def _select(batch: pa.Table, which: str, buckets: int | None = None) -> pa.Table:
    kept = pc.equal(batch.column("status"), "kept")
    hashed = pc.is_valid(batch.column("sha1"))
    mask = {"hashed": pc.and_(kept, hashed), "not hashed": pc.invert(pc.and_(kept, hashed)),
            "unhashed": pc.and_(kept, pc.invert(hashed)), "kept": kept, "not kept": pc.invert(kept),
            "scored": batch.column("scored")}[which]
    batch = batch.filter(mask).combine_chunks()
    if buckets:
        bucket = [int(h[:12], 16) % buckets for h in batch.column("sha1").to_pylist()]
        batch = batch.append_column("bucket", pa.array(bucket, pa.int64()))
    return batch


def _scores(table: pa.Table) -> dict[str, float]:
    """key -> CLIP score of the rows in the scored pool (the ranking every pool-wide rule walks)."""
    return {k: c for k, c, s in zip(table.column("key").to_pylist(), table.column("clip_content").to_pylist(),
                                    table.column("scored").to_pylist(), strict=True) if s}


def _with_rejections(table: pa.Table, rejected: dict[int, str]) -> pa.Table:
    status = table.column("status").to_pylist()
    reason = table.column("reason").to_pylist()
    for i, why in rejected.items():
        status[i], reason[i] = "rejected", why
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    return table.set_column(table.schema.get_field_index("reason"), "reason",
                            pa.array(reason, pa.string())).combine_chunks()


def _exact_stage(rows: Dataset, parts: int) -> Dataset:
    _warn_unhashed(rows.map_batches(_select, batch_format="pyarrow", fn_kwargs={"which": "unhashed"}).count())
    buckets = parts * 16  # groups of many image hashes each: a call per hash would cost more than the rule
    hashed = rows.map_batches(_select, batch_format="pyarrow", fn_kwargs={"which": "hashed", "buckets": buckets})
    decided = hashed.groupby("bucket", num_partitions=parts).map_groups(_exact_bucket, batch_format="pyarrow")
    rest = rows.map_batches(_select, batch_format="pyarrow", fn_kwargs={"which": "not hashed"})
    return rest.union(decided.drop_columns(["bucket"])).materialize()


def _exact_bucket(group: pa.Table) -> pa.Table:
    """Within each image hash of the bucket, all but the first in rank order are exact duplicates of it."""
    keys, hashes = group.column("key").to_pylist(), group.column("sha1").to_pylist()
    position = {k: i for i, k in enumerate(keys)}
    dropped = exact_duplicates(keys, hashes, _scores(group))
    return _with_rejections(group, {position[k]: _exact_reason(t, hashes[position[k]]) for k, t in dropped.items()})


def _near_stage(rows: Dataset, parts: int, threshold: float) -> Dataset:
    import ray

    candidates = rows.map_batches(_select, batch_format="pyarrow", fn_kwargs={"which": "kept"}).materialize()
    n = candidates.count()
    k = cluster_count(n)
    centroids = None
    if k > 1:
        fraction = min(n, k * TRAIN_PER_CLUSTER) / n
        sample = candidates.map_batches(_training_rows, batch_format="pyarrow", fn_kwargs={"fraction": fraction})
        centroids = ray.remote(num_cpus=1)(_train_task).remote(sample.select_columns(["key", "emb"])
                                                                .to_arrow_refs(), k)
    assigned = candidates.map_batches(_assign, batch_format="pyarrow", fn_kwargs={"centroids": centroids})
    decided = assigned.groupby("cluster", num_partitions=min(parts, k)).map_groups(
        _near_group, batch_format="pyarrow", fn_kwargs={"threshold": threshold}).drop_columns(["cluster"])
    rest = rows.map_batches(_select, batch_format="pyarrow", fn_kwargs={"which": "not kept"})
    return rest.union(decided).materialize()


def _training_rows(batch: pa.Table, fraction: float) -> pa.Table:
    return batch.filter(pa.array(training_mask(batch.column("key").to_pylist(), fraction, SEED)))


def _train_task(refs: list, k: int) -> np.ndarray:
    """k-means centroids from the training sample (one task: the sample is ~64 rows per centroid)."""
    import ray

    # key order: the sample :func:`decide` trains on; blocks that came through the join may carry ``emb`` as
    # large_binary, others as binary
    table = pa.concat_tables(ray.get(refs), promote_options="permissive").sort_by("key")
    train = _matrix(table)
    return train_centroids(train, min(k, len(train)), SEED)


def _assign(batch: pa.Table, centroids) -> pa.Table:
    if centroids is None:
        cluster = np.zeros(batch.num_rows, dtype=np.int64)
    else:
        import ray

        cluster = nearest_centroid(_matrix(batch), ray.get(centroids))
    return batch.append_column("cluster", pa.array(cluster, pa.int64())).combine_chunks()


def _near_group(group: pa.Table, threshold: float) -> pa.Table:
    group = group.sort_by("key")  # the members in key order, as in :func:`clustered_near_duplicates`
    keys = group.column("key").to_pylist()
    emb = _matrix(group)
    position = {k: i for i, k in enumerate(keys)}
    dropped = near_duplicates(keys, emb, _scores(group), threshold)
    return _with_rejections(group, {position[k]: _near_reason(t, c) for k, (t, c) in dropped.items()})


def _top_stage(rows: Dataset, fraction: float) -> Dataset:
    """Kept samples outside the best ``round(fraction * n)`` of the scored pool are rejected. The cut-off is the
    first row past that rank in a distributed sort by (score descending, key)."""
    pool = rows.map_batches(_select, batch_format="pyarrow", fn_kwargs={"which": "scored"}).select_columns(
        ["clip_content", "key"])
    n = pool.count()
    keep = int(math.floor(fraction * n + 0.5))
    cut = None
    if keep < n:
        ranked = pool.sort(["clip_content", "key"], descending=[True, False])
        first_out = ranked.split_at_indices([keep])[1].take(1)[0]
        cut = (first_out["clip_content"], first_out["key"])
    return rows.map_batches(_cut, batch_format="pyarrow", fn_kwargs={"cut": cut, "fraction": fraction})


def _cut(batch: pa.Table, cut: tuple[float, str] | None, fraction: float) -> pa.Table:
    rejected = {}
    for i, row in enumerate(batch.select(["status", "scored", "clip_content", "key"]).to_pylist()):
        if row["status"] != "kept":
            continue
        inside = row["scored"] and (cut is None or (-row["clip_content"], row["key"]) < (-cut[0], cut[1]))
        if not inside:
            rejected[i] = _top_reason(fraction)
    return _with_rejections(batch, rejected)


def _finish(batch: pa.Table) -> pa.Table:
    return batch.select(DECIDED.names).cast(DECIDED).combine_chunks()


# ---- counts ------------------------------------------------------------------------------------------------
RULES = (("failed", None), ("exact_duplicate", "exact duplicate of "), ("near_duplicate", "near-duplicate of "),
         ("top_fraction", "not in top_fraction"), ("min_clip", "clip "), ("no_caption", "no caption to score"),
         ("scores", "score_"))


def rule_of(status: str, reason: str | None) -> str | None:
    """The rule that removed a sample (``basic``: size, aspect ratio, caption length); None when kept."""
    if status == "kept":
        return None
    if status == "failed":
        return "failed"
    return next((n for n, prefix in RULES if prefix and (reason or "").startswith(prefix)), "basic")


def _rule_counts(batch: pa.Table) -> pa.Table:
    names = [rule_of(s, r) for s, r in zip(batch.column("status").to_pylist(), batch.column("reason").to_pylist(),
                                           strict=True)]
    counts = pc.value_counts(pa.array(names, pa.string()).drop_null())
    return pa.table({"rule": counts.field("values"), "n": counts.field("counts")},
                    schema=pa.schema([("rule", pa.string()), ("n", pa.int64())]))


def removed_by(decided: Dataset) -> dict[str, int]:
    """How many samples each rule removed, over the whole pool."""
    counts = {name: 0 for name, _ in RULES} | {"basic": 0}
    for row in decided.map_batches(_rule_counts, batch_format="pyarrow").take_all():
        counts[row["rule"]] += row["n"]
    return counts
