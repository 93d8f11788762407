"""``stylegen filter``: CLIP quality filtering of existing WebDataset corpora (image + txt/json caption).

Three passes, each resumable:
1. **Embed** (Ray actor pool): for every input sample not yet in the embeddings store, decode the image, record
   its size, and persist L2-normalised image and caption embeddings with the caption's CLIP score
   (``EMB/<name>.parquet``, keyed, committed atomically). A later run with other thresholds reuses them.
2. **Decide** (driver, pure functions in ``pipeline.selection``): failed inputs, basic checks, ``min_clip``,
   near-duplicates, and ``top_fraction`` of the whole pool; deterministic, so a resumed run decides the same.
3. **Write** (Ray write tasks): kept samples are copied into shards with their original members and bytes
   (never re-encoded); every sample gets an index row (DESIGN §5).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import posixpath
import time
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.config import (
    ConfigError,
    DecodeConfig,
    OutputConfig,
    RayConfig,
    ScoringConfig,
    _Strict,
)
from pipeline.dedup import clustered_near_duplicates, near_duplicates
from pipeline.fs import read_range
from pipeline.integrity import failed_mask, quarantine_unreadable, supersede
from pipeline.lease import Lease, LeaseHeld
from pipeline.selection import Candidate, basic_reason, top_fraction_keys
from pipeline.sink import OutputStore, commit_rows, shard_name
from pipeline.sources import IMAGE_EXTS, PROMPT_COLUMNS, SourceError, _expand, _id_root, _relative_id
from pipeline.tar_index import index_tar

log = logging.getLogger(__name__)


class CurateInput(_Strict):
    shards: str


class CurateFilter(_Strict):
    min_clip: float | None = Field(None, ge=-1, le=1)
    top_fraction: float | None = Field(None, gt=0, le=1)
    dedup_threshold: float | None = Field(None, gt=0, le=1)
    # clustered: k-means (faiss) then the greedy rule within each cluster (SemDeDup); greedy: the exact rule
    # over the whole pool, O(n^2). See pipeline.dedup.
    dedup_method: Literal["clustered", "greedy"] = "clustered"
    # byte-identical image payloads keep one sample (best CLIP score, ties by key); runs before the semantic dedup
    dedup_exact: bool = False
    min_side: int | None = Field(None, ge=1)
    max_aspect: float | None = Field(None, ge=1)
    min_caption_chars: int | None = Field(None, ge=0)
    max_caption_chars: int | None = Field(None, ge=1)


class EmbeddingsConfig(_Strict):
    path: str | None = None  # default OUTPUT/embeddings; point at another run's to re-filter without CLIP work


class FilterRunConfig(_Strict):
    kind: Literal["filter"] = "filter"
    input: CurateInput
    output: OutputConfig
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    filter: CurateFilter = Field(default_factory=CurateFilter)
    embeddings: EmbeddingsConfig = Field(default_factory=EmbeddingsConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def embeddings_path(self) -> str:
        return self.embeddings.path or f"{self.output.path.rstrip('/')}/embeddings"

    def filter_hash(self) -> str:
        rules = self.filter.model_dump()
        if rules["dedup_method"] == "greedy" or rules["dedup_threshold"] is None:
            del rules["dedup_method"]  # the rule of outputs made before the option existed: their hash stays
        if not rules["dedup_exact"]:
            del rules["dedup_exact"]
        blob = json.dumps({"filter": rules, "input": self.input.shards,
                           "clip": [self.scoring.clip_model, self.scoring.clip_pretrained]}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


EMB_SCHEMA = pa.schema([
    ("key", pa.string()), ("clip", pa.float64()), ("width", pa.int64()), ("height", pa.int64()),
    ("caption", pa.string()), ("error", pa.string()),
    ("image_emb", pa.list_(pa.float32())), ("text_emb", pa.list_(pa.float32())),
    ("sha1", pa.string()),  # of the image member's bytes (exact dedup); null in files embedded before it existed
])


# ---- plan --------------------------------------------------------------------------------------------------
LISTING_TASKS = 2_000  # at most this many Ray tasks index the input tars (a chunk of tars each)


def plan_inputs(cfg: FilterRunConfig) -> list[dict[str, Any]]:
    """One row per input sample: key, source id, tar URL and member offsets (no image bytes read). With Ray
    initialised the tars are indexed by Ray tasks in parallel (the driver lists file names only); the rows come
    back in file order."""
    urls = _expand(cfg.input.shards, "input.shards", exclude=[cfg.output.path])  # never its own output
    if not urls:
        raise SourceError(f"input.shards: no files match {cfg.input.shards}")
    from pipeline.fs import get_fs

    root = _id_root(get_fs(cfg.input.shards)[1])
    jobs = [(url, _relative_id(url, root)) for url in urls]
    size = max(1, -(-len(jobs) // LISTING_TASKS))
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    import ray

    if len(chunks) < 2 or not ray.is_initialized():
        return [row for chunk in chunks for row in _index_tars(chunk)]
    from pipeline.plan_dataset import source_error_in

    task = ray.remote(num_cpus=1)(_index_tars_task)
    try:
        parts = ray.get([task.remote(chunk) for chunk in chunks])
    except Exception as exc:
        found = source_error_in(exc)
        if found is None:
            raise
        raise found from None
    return [row for part in parts for row in part]


def _index_tars_task(jobs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    from pipeline.plan_dataset import PlanSourceError

    try:
        return _index_tars(jobs)
    except SourceError as exc:
        raise PlanSourceError(str(exc)) from None


def _index_tars(jobs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    rows = []
    for url, base in jobs:
        try:
            tar = index_tar(url)
        except FileNotFoundError:
            raise SourceError(f"input.shards: not found: {url}") from None
        except Exception as exc:
            raise SourceError(f"input.shards: cannot read {url} ({exc.__class__.__name__}: {exc})") from None
        for sample in tar.samples:
            source_id = f"{base}/{sample.key}"
            rows.append({"key": hashlib.sha1(source_id.encode()).hexdigest()[:16], "content_id": source_id,
                         "url": url, "members": json.dumps(sample.members, sort_keys=True), "error": sample.error})
    return rows


# ---- pass 1: embeddings --------------------------------------------------------------------------------
def _caption(url: str, members: dict[str, list[int]]) -> str | None:
    for ext in ("txt", "json"):
        if ext in members and members[ext][1] <= 1_000_000:
            raw = read_range(url, *members[ext])
            try:
                text = raw.decode("utf-8")
                if ext == "txt":
                    return text.strip()
                obj = json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(obj, dict):
                for col in PROMPT_COLUMNS:
                    if isinstance(obj.get(col), str):
                        return obj[col].strip()
    return None


class Embedder:
    """Actor: image + caption embeddings and the caption CLIP score, batched."""

    def __init__(self, scoring: dict[str, Any], decode: dict[str, Any]):
        from operators.clip_score import ClipScorer
        from pipeline.stages import pick_device

        self.scorer = ClipScorer(scoring["clip_model"], scoring["clip_pretrained"],
                                 device=pick_device(float(scoring.get("num_gpus") or 0)))
        self.decode = DecodeConfig.model_validate(decode)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(self.embed(batch.to_pylist()), schema=EMB_SCHEMA)

    def embed(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from PIL import Image

        from pipeline.images import DecodeError, decode_image

        out, images, captions = [], [], []
        for row in rows:
            members = json.loads(row["members"])
            rec = {"key": row["key"], "clip": None, "width": None, "height": None, "caption": None, "error": None,
                   "image_emb": None, "text_emb": None, "sha1": None}
            out.append(rec)
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            if row.get("error"):
                rec["error"] = row["error"]
                continue
            if ext is None:
                rec["error"] = f"no image member (has: {', '.join(sorted(members))})"
                continue
            try:
                data = read_range(row["url"], *members[ext])
                rec["sha1"] = hashlib.sha1(data).hexdigest()
                with Image.open(io.BytesIO(data)) as probe:
                    rec["width"], rec["height"] = probe.size
                image = decode_image(data, max_pixels=self.decode.max_pixels, max_side=self.decode.max_side)
                rec["caption"] = _caption(row["url"], members)
            except (DecodeError, OSError, ValueError, SyntaxError) as exc:
                rec["error"] = f"image: {exc}"
                continue
            images.append((rec, image))
            captions.append(rec["caption"])
        if images:
            img_emb = self.scorer.embed_images([im for _, im in images])
            with_text = [i for i, c in enumerate(captions) if c]
            txt_emb = self.scorer.embed_texts([captions[i] for i in with_text]) if with_text else None
            for (rec, _), emb in zip(images, img_emb, strict=True):
                rec["image_emb"] = emb.tolist()
            for j, i in enumerate(with_text):
                rec = images[i][0]
                rec["text_emb"] = txt_emb[j].tolist()
                rec["clip"] = float(img_emb[i] @ txt_emb[j])
        return out


class EmbeddingSink:
    """Ray Datasink writing ``EMB/<sha1(keys)>.parquet`` files atomically (same protocol as the shards)."""

    def __new__(cls, path: str, fsync: bool):
        from ray.data import Datasink
        from ray.data.block import BlockAccessor

        class _Sink(Datasink):
            def write(self, blocks, ctx):
                tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
                tables = [t for t in tables if t.num_rows]
                if not tables:
                    return 0
                table = pa.concat_tables(tables).cast(EMB_SCHEMA)
                name = shard_name(table.column("key").to_pylist())
                OutputStore(path, fsync=fsync).put_table(".", name, table)
                return table.num_rows

        return _Sink()


# ---- pass 2: decisions ----------------------------------------------------------------------------------
Decision = tuple[str, str | None, float | None]  # (status, reason, clip score)


def decide(plan: list[dict[str, Any]], emb: pa.Table, f: CurateFilter) -> dict[str, Decision]:
    """key -> (status, reason, clip) for every planned key."""
    by_key = {k: i for i, k in enumerate(emb.column("key").to_pylist())}
    clip_col = emb.column("clip").to_pylist()
    decisions: dict[str, Decision] = {}
    candidates: list[str] = []
    scores: dict[str, float] = {}
    for row in plan:
        i = by_key[row["key"]]
        rec = Candidate(row["key"], clip_col[i], emb["width"][i].as_py(), emb["height"][i].as_py(),
                        len(emb["caption"][i].as_py() or ""), emb["error"][i].as_py())
        if rec.error:
            decisions[rec.key] = ("failed", rec.error, None)
            continue
        if rec.clip is not None and math.isfinite(rec.clip):
            scores[rec.key] = rec.clip
        reason = basic_reason(rec, min_side=f.min_side, max_aspect=f.max_aspect,
                              min_caption_chars=f.min_caption_chars, max_caption_chars=f.max_caption_chars)
        if reason is None and f.min_clip is not None and (rec.clip is None or rec.clip < f.min_clip):
            reason = "no caption to score" if rec.clip is None else f"clip {rec.clip:.4f} < min_clip {f.min_clip}"
        decisions[rec.key] = ("rejected", reason, rec.clip) if reason else ("kept", None, rec.clip)
        if not reason:
            candidates.append(rec.key)
    if f.dedup_exact and candidates:
        candidates = _exact_duplicates(candidates, emb, by_key, scores, decisions)
    if f.dedup_threshold is not None and candidates:
        idx = [by_key[k] for k in candidates]
        mat = np.asarray(emb.column("image_emb").take(pa.array(idx)).to_pylist(), dtype=np.float32)
        dedup = clustered_near_duplicates if f.dedup_method == "clustered" else near_duplicates
        for key, (twin, cos) in dedup(candidates, mat, scores, f.dedup_threshold).items():
            decisions[key] = ("rejected", f"near-duplicate of {twin} (cosine {cos:.4f})", scores.get(key))
    if f.top_fraction is not None:
        best = top_fraction_keys(scores, f.top_fraction)
        for key, (status, _, clip) in decisions.items():
            if status == "kept" and key not in best:
                decisions[key] = ("rejected", f"not in top_fraction {f.top_fraction} of the pool", clip)
    return decisions


def _exact_duplicates(candidates: list[str], emb: pa.Table, by_key: dict[str, int], scores: dict[str, float],
                      decisions: dict[str, Decision]) -> list[str]:
    """Reject all but the best-scored (ties by key) of each group of byte-identical images; return the rest."""
    hashes = emb.column("sha1").to_pylist() if "sha1" in emb.column_names else [None] * emb.num_rows
    best: dict[str, str] = {}
    unhashed = 0
    for key in sorted(candidates, key=lambda k: (-scores.get(k, -math.inf), k)):
        digest = hashes[by_key[key]]
        if digest is None:
            unhashed += 1
        elif digest in best:
            decisions[key] = ("rejected", f"exact duplicate of {best[digest]} (sha1 {digest[:12]})",
                              decisions[key][2])
        else:
            best[digest] = key
    if unhashed:
        log.warning("dedup_exact: %d samples were embedded before image hashes were recorded; they are not "
                    "checked (re-embed with a new embeddings.path to include them)", unhashed)
    return [k for k in candidates if decisions[k][0] == "kept"]


RULES = (("failed", None), ("exact_duplicate", "exact duplicate of "), ("near_duplicate", "near-duplicate of "),
         ("top_fraction", "not in top_fraction"), ("min_clip", "clip "), ("no_caption", "no caption to score"))


def removed_by(decisions: dict[str, Decision]) -> dict[str, int]:
    """How many samples each rule removed (``basic``: size, aspect ratio, caption length)."""
    counts = {name: 0 for name, _ in RULES} | {"basic": 0}
    for status, reason, _ in decisions.values():
        if status == "kept":
            continue
        if status == "failed":
            counts["failed"] += 1
            continue
        name = next((n for n, prefix in RULES if prefix and (reason or "").startswith(prefix)), "basic")
        counts[name] += 1
    return counts


# ---- pass 3: write ----------------------------------------------------------------------------------------
class CurateSink:
    """Ray Datasink: kept samples copied with their original members; index rows for all."""

    def __new__(cls, output: dict[str, Any]):
        from ray.data import Datasink
        from ray.data.block import BlockAccessor

        out = OutputConfig.model_validate(output)

        class _Sink(Datasink):
            @property
            def min_rows_per_write(self) -> int:
                return out.samples_per_shard

            def write(self, blocks, ctx):
                rows = [r for b in blocks for r in BlockAccessor.for_block(b).to_arrow().to_pylist()]
                if not rows:
                    return {}
                return commit_rows(OutputStore(out.path, fsync=out.fsync), rows, out, make_sample=copy_members)

        return _Sink()


def copy_members(row: dict[str, Any], out: OutputConfig) -> dict[str, bytes | str]:
    """A kept sample's original members, byte for byte, under its output key."""
    sample: dict[str, bytes | str] = {"__key__": row["key"]}
    for ext, (offset, size) in json.loads(row["members"]).items():
        sample[ext] = read_range(row["url"], offset, size)
    return sample


# ---- driver -------------------------------------------------------------------------------------------------
def curate(cfg: FilterRunConfig, *, address: str | None = None, quiet: bool = False,
           retry_failed: str | None = None):
    """Run (or resume) a filter job under the writer leases of its output and (when it embeds) of its embeddings
    store; returns a RunSummary and writes ``run.json``. ``retry_failed`` re-plans failed samples (those whose
    reason contains it; "" for all), embeddings included."""
    from pipeline.run import init_ray

    lease = Lease(cfg.output.path, ttl_s=cfg.output.lease_ttl_s)
    lease.check()  # a second writer is refused before it plans
    started_ray = init_ray(address or cfg.ray.address, quiet=quiet)
    try:
        plan = plan_inputs(cfg)  # read-only: an input error exits before anything is created under the output
        return _leased(cfg, lease, plan, address=address, quiet=quiet, retry_failed=retry_failed)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _leased(cfg: FilterRunConfig, lease: Lease, plan: list[dict[str, Any]], *, address: str | None, quiet: bool,
            retry_failed: str | None):
    with lease:
        emb_lease = Lease(cfg.embeddings_path(), ttl_s=cfg.output.lease_ttl_s)
        try:
            emb_lease.acquire()
        except LeaseHeld as exc:  # another filter embeds into a shared store: fine while we only read it
            emb_lease = None
            held = exc
        else:
            held = None
        try:
            return _curate(cfg, plan, address=address, quiet=quiet, retry_failed=retry_failed, emb_held=held)
        finally:
            if emb_lease is not None:
                emb_lease.release()


def _curate(cfg: FilterRunConfig, plan: list[dict[str, Any]], *, address: str | None, quiet: bool,
            retry_failed: str | None, emb_held: LeaseHeld | None):
    import ray
    from ray.data import ActorPoolStrategy

    from operators.clip_score import resolve_clip
    from pipeline.run import (
        RunSummary,
        _gpu_args,
        configure_data_context,
        init_ray,
        open_output,
        package_versions,
    )

    started = time.time()
    store = OutputStore(cfg.output.path, fsync=cfg.output.fsync)
    previous = store.read_json("run.json")
    if previous and store.index_files() and previous.get("filter_hash") != cfg.filter_hash():
        raise ConfigError(f"output.path: {cfg.output.path} already holds a filter run with other settings; use a new "
                          "output path (set embeddings.path to reuse its embeddings)")
    opened = open_output(store, None)
    emb_store = OutputStore(cfg.embeddings_path(), fsync=cfg.output.fsync)
    if emb_held is None:
        emb_store.clear_tmp()
        quarantine_unreadable(emb_store, ".")
    if retry_failed is not None:
        retried = set(supersede(store, "index", failed_mask(retry_failed)))
        opened["retried"] = len(retried)
        if retried:
            if emb_held is not None:
                raise emb_held
            supersede(emb_store, ".", lambda t: pc.fill_null(pc.is_in(t.column("key"), pa.array(sorted(retried))),
                                                             False))
    emb_model = emb_store.read_json("_model.json")
    model_id = [cfg.scoring.clip_model, cfg.scoring.clip_pretrained]
    if emb_model and emb_model.get("clip") != model_id:
        raise ConfigError(f"embeddings.path: {cfg.embeddings_path()} holds embeddings of {emb_model.get('clip')}, "
                          f"not {model_id}")
    embedded = set(emb_store.read_tables(".", ["key"]).column("key").to_pylist())
    done = store.done_keys()
    to_embed = [r for r in plan if r["key"] not in embedded]
    to_write = [r for r in plan if r["key"] not in done]
    summary = RunSummary(planned=len(plan), skipped=len(plan) - len(to_write), **opened)
    removed: dict[str, int] | None = None  # by rule, over the whole pool; None when nothing was decided
    started_ray = False
    try:
        if to_embed or to_write:
            started_ray = init_ray(address or cfg.ray.address, quiet=quiet)
            configure_data_context(cfg.ray.wait_for_actors_s, quiet)
        if to_embed:
            if emb_held is not None:
                raise emb_held
            emb_store.write_json("_model.json", {"clip": model_id})
            sc = cfg.scoring
            ds = ray.data.from_items(to_embed, override_num_blocks=max(1, math.ceil(len(to_embed) / sc.batch_size)))
            ds = ds.map_batches(Embedder, batch_format="pyarrow", batch_size=sc.batch_size,
                                compute=ActorPoolStrategy(min_size=sc.actors[0], max_size=sc.actors[1]),
                                fn_constructor_kwargs={"scoring": sc.model_dump(), "decode": cfg.decode.model_dump()},
                                num_cpus=sc.num_cpus, **_gpu_args(sc.num_gpus))
            ds.write_datasink(EmbeddingSink(cfg.embeddings_path(), cfg.output.fsync))
        summary.timings["embed_s"] = round(time.time() - started, 3)
        if to_write:
            emb = emb_store.read_tables(".", None)
            decisions = decide(plan, emb, cfg.filter)
            removed = removed_by(decisions)
            rows = []
            for r in to_write:
                status, reason, clip = decisions[r["key"]]
                rows.append({**r, "status": status, "reason": reason, "clip_content": clip, "prompt": None,
                             "meta": json.dumps({"source": posixpath.basename(r["url"]), "members":
                                                 sorted(json.loads(r["members"]))})})
            _fill_captions(rows, emb)
            blocks = max(1, math.ceil(len(rows) / cfg.output.samples_per_shard))
            ray.data.from_items(rows, override_num_blocks=blocks).write_datasink(
                CurateSink(cfg.output.model_dump()))
    finally:
        if started_ray:
            ray.shutdown()
    dataset = _tally(store, summary, [r["key"] for r in to_write], {r["key"] for r in plan})
    summary.timings["total_s"] = round(time.time() - started, 3)
    _, _, meaningful = resolve_clip(cfg.scoring.clip_model, cfg.scoring.clip_pretrained)
    store.write_json("run.json", {
        "kind": "filter", "config": cfg.model_dump(mode="json"), "filter_hash": cfg.filter_hash(),
        "versions": package_versions(), "this_run": asdict(summary),
        "counters": {"clip_images_encoded": len(to_embed), "embeddings_reused": len(plan) - len(to_embed)},
        "removed_by": removed if removed is not None else (previous or {}).get("removed_by"),
        "dataset": dataset, "scores_meaningful": meaningful,
    })
    return summary


def _fill_captions(rows: list[dict[str, Any]], emb: pa.Table) -> None:
    captions = dict(zip(emb.column("key").to_pylist(), emb.column("caption").to_pylist(), strict=True))
    for row in rows:
        row["prompt"] = captions.get(row["key"])


def _tally(store: OutputStore, summary, todo_keys: list[str], planned_keys: set[str]) -> dict[str, Any]:
    """This run's outcomes into ``summary`` and the totals over the planned keys, from the committed index.
    (Holds the keys in the driver: the filter's plan is still a driver list; see issue 14.)"""
    index = store.read_index(["key", "status"])
    status = dict(zip(index.column("key").to_pylist(), index.column("status").to_pylist(), strict=True))
    missing = [k for k in todo_keys if k not in status]
    if missing:
        raise RuntimeError(f"{len(missing)} planned samples have no index row after the run (e.g. {missing[0]})")
    for key in todo_keys:
        setattr(summary, status[key], getattr(summary, status[key]) + 1)
    totals = {"kept": 0, "rejected": 0, "failed": 0}
    for key, st in status.items():
        if key in planned_keys:
            totals[st] = totals.get(st, 0) + 1
    return {"planned": len(planned_keys), **totals, "complete": sum(totals.values()) == len(planned_keys)}
