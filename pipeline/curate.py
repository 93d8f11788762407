"""``stylegen filter``: CLIP quality filtering of existing WebDataset corpora (image + txt/json caption).

The driver lists tar names and holds counts; everything per sample runs on the cluster (docs/architecture.md §10):
0. **List** (Ray tasks, a chunk of tars each): one row per sample with its member offsets, into the object store.
1. **Embed** (Ray actor pool): for every input sample not yet in the embeddings store, decode the image, record
   its size and hash, and persist L2-normalised image and caption embeddings with the caption's CLIP score
   (``EMB/<name>.parquet``, keyed, committed atomically). A later run with other thresholds reuses them.
2. **Decide** (``pipeline.curate_decide``): failed inputs, basic checks, ``min_clip``, exact and near-duplicates,
   and ``top_fraction`` of the whole pool; deterministic, so a resumed run decides the same.
3. **Write** (Ray write tasks): kept samples are copied into shards with their original bytes (never
   re-encoded), under stylegen's own key: the screened image and the text members only (``pipeline.members``:
   foreign names never reach the writer); every sample gets an index row (docs/architecture.md §5).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from pipeline.config import (
    ConfigError,
    DecodeConfig,
    OutputConfig,
    RayConfig,
    ScoringConfig,
    SourcesConfig,
    _Strict,
    check_score_rules,
)
from pipeline.fs import read_range
from pipeline.integrity import failed_mask, quarantine_unreadable, supersede
from pipeline.lease import Lease, LeaseHeld
from pipeline.members import kept_members, screened_image, shown
from pipeline.ownership import check_overlap, check_owned, claim
from pipeline.sink import OutputStore, commit_rows, shard_name
from pipeline.sources import SourceError, _expand, _id_root, _relative_id
from pipeline.tar_index import index_tar

if TYPE_CHECKING:
    from ray.data import Dataset

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
    # per quality head (scoring.heads), from the persisted image embeddings: outside the bounds is rejected
    min_scores: dict[str, float] = Field(default_factory=dict)
    max_scores: dict[str, float] = Field(default_factory=dict)


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
    sources: SourcesConfig = Field(default_factory=SourcesConfig)  # the protocols input.shards may use
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _score_rules(self) -> FilterRunConfig:
        check_score_rules(self.scoring.heads, self.filter)
        return self

    def embeddings_path(self) -> str:
        return self.embeddings.path or f"{self.output.path.rstrip('/')}/embeddings"

    def filter_hash(self) -> str:
        rules = self.filter.model_dump()
        if rules["dedup_method"] == "greedy" or rules["dedup_threshold"] is None:
            del rules["dedup_method"]  # the rule of outputs made before the option existed: their hash stays
        if not rules["dedup_exact"]:
            del rules["dedup_exact"]
        for name in ("min_scores", "max_scores"):  # outputs made before heads existed keep their hash
            if not rules[name]:
                del rules[name]
        what = {"filter": rules, "input": self.input.shards,
                "clip": [self.scoring.clip_model, self.scoring.clip_pretrained]}
        if self.scoring.heads:
            what["heads"] = self.scoring.heads_dump()
        blob = json.dumps(what, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


EMB_SCHEMA = pa.schema([
    ("key", pa.string()), ("clip", pa.float64()), ("width", pa.int64()), ("height", pa.int64()),
    ("caption", pa.string()), ("error", pa.string()),
    ("image_emb", pa.list_(pa.float32())), ("text_emb", pa.list_(pa.float32())),
    ("sha1", pa.string()),  # of the image member's bytes (exact dedup); null in files embedded before it existed
    # JSON {head: score} of the scoring.heads configured when embedded (a record for readers of the store; the
    # decisions recompute the heads from image_emb, so a re-filter with other heads needs no CLIP work)
    ("scores", pa.string()),
])


# ---- plan ----------------------------------------------------------------------------------------------
LISTING_TASKS = 2_000  # at most this many Ray tasks index the input tars (a chunk of tars each)
INPUT_SCHEMA = pa.schema([("key", pa.string()), ("content_id", pa.string()), ("url", pa.string()),
                          ("members", pa.string()), ("error", pa.string())])


def list_inputs(cfg: FilterRunConfig) -> list[tuple[str, str]]:
    """The input tars (URL, id base) in name order: the only per-file state the driver holds."""
    urls = _expand(cfg.input.shards, "input.shards", exclude=[cfg.output.path],  # never its own output
                   policy=cfg.sources)
    if not urls:
        raise SourceError(f"input.shards: no files match {cfg.input.shards}")
    from pipeline.fs import get_fs

    root = _id_root(get_fs(cfg.input.shards)[1])
    return [(url, _relative_id(url, root)) for url in urls]


def input_dataset(jobs: list[tuple[str, str]]) -> Dataset:
    """One row per input sample (key, source id, tar URL, member offsets; no image bytes read), the tars indexed
    by Ray tasks, a chunk of tars each (lazy: :func:`index_inputs` runs it once into the object store)."""
    import ray

    items = [{"url": url, "base": base} for url, base in jobs]
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), LISTING_TASKS))).map_batches(
        _index_block, batch_format="pyarrow", batch_size=None)


def index_inputs(jobs: list[tuple[str, str]]) -> Dataset:
    """:func:`input_dataset` indexed once into the object store (the driver holds block references only); a tar
    that cannot be read raises the SourceError the CLI prints."""
    from pipeline.plan_dataset import _run

    return _run(lambda: input_dataset(jobs).materialize(), "input.shards")  # made inside: it takes the context


def _index_block(batch: pa.Table) -> pa.Table:
    from pipeline.plan_dataset import PlanSourceError

    jobs = list(zip(batch.column("url").to_pylist(), batch.column("base").to_pylist(), strict=True))
    try:
        return pa.Table.from_pylist(_index_tars(jobs), schema=INPUT_SCHEMA)
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
    """The sample's caption, by the reader ``run`` uses too (``pipeline.captions``): a bad one costs a warning
    and the caption, never the sample."""
    from pipeline.captions import read_caption

    return read_caption(lambda offset, size: read_range(url, offset, size), members, url)


def _stable(exc: BaseException) -> str:
    """An exception as reason text that is the same on every run: no ``<... object at 0x...>`` addresses."""
    return _ADDRESS_RE.sub("<object>", f"{exc}")


_ADDRESS_RE = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


class Embedder:
    """Actor: image + caption embeddings and the caption CLIP score, batched."""

    def __init__(self, scoring: dict[str, Any], decode: dict[str, Any]):
        from operators.clip_score import ClipScorer
        from operators.heads import HeadSet
        from pipeline.stages import pick_device

        device = pick_device(float(scoring.get("num_gpus") or 0))
        self.scorer = ClipScorer(scoring["clip_model"], scoring["clip_pretrained"], device=device)
        self.heads = HeadSet(scoring.get("heads") or {}, self.scorer.embed_dim, device=device)
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
                   "image_emb": None, "text_emb": None, "sha1": None, "scores": None}
            out.append(rec)
            ext = screened_image(members)  # the one image member a kept sample keeps (pipeline.members)
            if row.get("error"):
                rec["error"] = row["error"]
                continue
            if ext is None:
                rec["error"] = f"no image member (has: {', '.join(shown(e) for e in sorted(members))})"
                continue
            oversized = [e for e in kept_members(members)[0] if members[e][1] > self.decode.max_bytes]
            if oversized:  # every member a kept sample copies is bounded, checked from the tar index alone
                e = oversized[0]
                rec["error"] = f"member .{shown(e)}: {members[e][1]} bytes, more than decode.max_bytes=" \
                               f"{self.decode.max_bytes}"
                continue
            try:
                data = read_range(row["url"], *members[ext], max_bytes=self.decode.max_bytes)
                rec["sha1"] = hashlib.sha1(data).hexdigest()
                # the guards of `run` (decode.max_pixels, max_aspect) from the header first, stable reasons
                image = decode_image(data, max_pixels=self.decode.max_pixels, max_side=self.decode.max_side,
                                     max_aspect=self.decode.max_aspect)
                with Image.open(io.BytesIO(data)) as probe:
                    rec["width"], rec["height"] = probe.size  # the stored size (decode_image may shrink it)
                rec["caption"] = _caption(row["url"], members)
            except (DecodeError, OSError, ValueError, SyntaxError) as exc:
                rec["error"] = f"image: {_stable(exc)}"
                continue
            images.append((rec, image))
            captions.append(rec["caption"])
        if images:
            img_emb = self.scorer.embed_images([im for _, im in images])
            with_text = [i for i, c in enumerate(captions) if c]
            txt_emb = self.scorer.embed_texts([captions[i] for i in with_text]) if with_text else None
            heads = self.heads.rows(img_emb) if self.heads else [None] * len(images)
            for (rec, _), emb, h in zip(images, img_emb, heads, strict=True):
                rec["image_emb"] = emb.tolist()
                rec["scores"] = json.dumps(h, sort_keys=True) if h is not None else None
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
    """A kept sample's screened image and its text members (``pipeline.members.kept_members``), byte for byte,
    under its output key; the sample's own names (``__key__``, other members) are never written."""
    members = json.loads(row["members"])
    sample: dict[str, bytes | str] = {ext: read_range(row["url"], *members[ext]) for ext in kept_members(members)[0]}
    sample["__key__"] = row["key"]
    return sample


# ---- driver -------------------------------------------------------------------------------------------------
def curate(cfg: FilterRunConfig, *, address: str | None = None, quiet: bool = False,
           retry_failed: str | None = None):
    """Run (or resume) a filter job under the writer leases of its output and (when it embeds) of its embeddings
    store; returns a RunSummary and writes ``run.json``. ``retry_failed`` re-plans failed samples (those whose
    reason contains it; "" for all), embeddings included."""
    from pipeline.run import configure_data_context, init_ray

    check_owned(cfg.output.path)  # a folder stylegen did not make is refused before anything is read
    check_overlap(cfg.output.path, [("input.shards", cfg.input.shards)])
    if cfg.embeddings.path:
        check_owned(cfg.embeddings.path)
        check_overlap(cfg.embeddings.path, [("input.shards", cfg.input.shards)])
    lease = Lease(cfg.output.path, ttl_s=cfg.output.lease_ttl_s)
    lease.check()  # a second writer is refused before it plans
    jobs = list_inputs(cfg)
    started_ray = init_ray(address or cfg.ray.address, quiet=quiet, runtime_env=cfg.ray.runtime_env)
    try:
        configure_data_context(cfg.ray.wait_for_actors_s, quiet)
        # Indexed once into the object store (the driver holds block references): an input error exits before
        # anything is created under the output, and the four passes below read the listing, not the tars.
        plan = index_inputs(jobs)
        claim(cfg.output.path, "filter")  # the marker first, before the lease file or anything else
        claim(cfg.embeddings_path(), "embeddings")
        with lease:
            return _with_embeddings_lease(cfg, plan, quiet=quiet, retry_failed=retry_failed)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _with_embeddings_lease(cfg: FilterRunConfig, plan: Dataset, *, quiet: bool, retry_failed: str | None):
    emb_lease = Lease(cfg.embeddings_path(), ttl_s=cfg.output.lease_ttl_s)
    try:
        emb_lease.acquire()
    except LeaseHeld as exc:  # another filter embeds into a shared store: fine while we only read it
        emb_lease = None
        held = exc
    else:
        held = None
    try:
        return _curate(cfg, plan, quiet=quiet, retry_failed=retry_failed, emb_held=held)
    finally:
        if emb_lease is not None:
            emb_lease.release()


def _curate(cfg: FilterRunConfig, plan: Dataset, *, quiet: bool, retry_failed: str | None,
            emb_held: LeaseHeld | None):
    from ray.data import ActorPoolStrategy

    from operators.clip_score import resolve_clip
    from pipeline.curate_decide import decisions_dataset, removed_by
    from pipeline.redact import public_config
    from pipeline.resume import todo_dataset
    from pipeline.run import RunSummary, _gpu_args, open_output, package_versions, tally

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
        retried = supersede(store, "index", failed_mask(retry_failed))
        opened["retried"] = len(retried)
        if retried:
            if emb_held is not None:
                raise emb_held
            keys = pa.array(sorted(retried))  # the failed keys of this output (a --retry-failed, not a whole pool)
            supersede(emb_store, ".", lambda t: pc.fill_null(pc.is_in(t.column("key"), keys), False))
    emb_model = emb_store.read_json("_model.json")
    model_id = [cfg.scoring.clip_model, cfg.scoring.clip_pretrained]
    if emb_model and emb_model.get("clip") != model_id:
        raise ConfigError(f"embeddings.path: {cfg.embeddings_path()} holds embeddings of {emb_model.get('clip')}, "
                          f"not {model_id}")
    sc, out = cfg.scoring, cfg.output
    planned = plan.count()  # from the block metadata of the materialized listing
    to_embed = todo_dataset(plan, emb_store, emb_store.parquet_files("."), sc.batch_size, column=None)
    n_embed = to_embed.count()
    before = store.index_files()
    n_todo = todo_dataset(plan, store, before, out.samples_per_shard).count() if before else planned
    summary = RunSummary(planned=planned, skipped=planned - n_todo, **opened)
    removed: dict[str, int] | None = None  # by rule, over the whole pool; None when nothing was decided
    if n_embed:
        if emb_held is not None:
            raise emb_held
        emb_store.write_json("_model.json", {"clip": model_id})
        ds = to_embed.repartition(target_num_rows_per_block=sc.batch_size).map_batches(
            Embedder, batch_format="pyarrow", batch_size=sc.batch_size,
            compute=ActorPoolStrategy(min_size=sc.actors[0], max_size=sc.actors[1]),
            fn_constructor_kwargs={"scoring": sc.model_dump(), "decode": cfg.decode.model_dump()},
            num_cpus=sc.num_cpus, **_gpu_args(sc.num_gpus))
        ds.write_datasink(EmbeddingSink(cfg.embeddings_path(), out.fsync))
    summary.timings["embed_s"] = round(time.time() - started, 3)
    if n_todo:
        decided = decisions_dataset(plan, planned, emb_store, cfg.filter.model_dump(),
                                    sc.heads_dump()).materialize()
        removed = removed_by(decided)
        todo = todo_dataset(decided, store, before, out.samples_per_shard)
        todo.repartition(target_num_rows_per_block=out.samples_per_shard).write_datasink(
            CurateSink(out.model_dump()))
    dataset = tally(cfg, store, summary, set(before), n_todo, plan)
    summary.timings["total_s"] = round(time.time() - started, 3)
    _, _, meaningful = resolve_clip(sc.clip_model, sc.clip_pretrained)
    store.write_json("run.json", {
        "kind": "filter", "config": public_config(cfg), "filter_hash": cfg.filter_hash(),
        "versions": package_versions(), "this_run": asdict(summary),
        "counters": {"clip_images_encoded": n_embed, "embeddings_reused": planned - n_embed},
        "removed_by": removed if removed is not None else (previous or {}).get("removed_by"),
        "dataset": dataset, "scores_meaningful": meaningful,
    })
    return summary
