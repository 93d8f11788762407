"""``stylegen filter``: CLIP quality filtering of existing WebDataset corpora (image + txt/json caption).

The driver lists tar names and holds counts; everything per sample runs on the cluster (docs/architecture.md §10):
0. **List** (Ray tasks, a chunk of tars each): one row per sample with its member offsets, into the object store.
1. **Embed** (Ray actor pool): for every input sample not yet in the embeddings store, decode the image, record
   its size and hash, and persist L2-normalised image and caption embeddings with the caption's CLIP score
   (``EMB/<name>.parquet``, keyed, committed atomically). A later run with other thresholds reuses them.
2. **Decide** (``pipeline.filter.decide``): failed inputs, basic checks, ``min_clip``, exact and near-duplicates,
   and ``top_fraction`` of the whole pool; deterministic, so a resumed run decides the same.
3. **Write** (Ray write tasks): kept samples are copied into shards with their original bytes (never
   re-encoded), under stylegen's own key: the screened image and the text members only (``pipeline.io.members``:
   foreign names never reach the writer); every sample gets an index row (docs/architecture.md §5).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ConfigError, FilterRunConfig
from pipeline.filter.embed import Embedder
from pipeline.filter.inputs import index_inputs, list_inputs
from pipeline.filter.write import copy_members
from pipeline.output.integrity import failed_mask, open_output, quarantine_unreadable, supersede
from pipeline.output.lease import Lease, LeaseHeld
from pipeline.output.ownership import check_overlap, check_owned, claim
from pipeline.output.progress import ProgressReporter
from pipeline.output.record import RunSummary, run_record, scores_note, tally
from pipeline.output.resume import todo_dataset
from pipeline.output.sink import ShardDatasink, TableDatasink
from pipeline.output.store import OutputStore
from pipeline.schema import EMB_SCHEMA
from pipeline.session import gpu_args, ray_session
from pipeline.stall import Pool, StallWatch, guard

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger(__name__)


def curate(cfg: FilterRunConfig, *, address: str | None = None, quiet: bool = False,
           retry_failed: str | None = None):
    """Run (or resume) a filter job under the writer leases of its output and (when it embeds) of its embeddings
    store; returns a RunSummary and writes ``run.json``. ``retry_failed`` re-plans failed samples (those whose
    reason contains it; "" for all), embeddings included."""
    check_owned(cfg.output.path)  # a folder stylegen did not make is refused before anything is read
    check_overlap(cfg.output.path, [("input.shards", cfg.input.shards)])
    if cfg.embeddings.path:
        check_owned(cfg.embeddings.path)
        check_overlap(cfg.embeddings.path, [("input.shards", cfg.input.shards)])
    lease = Lease(cfg.output.path, ttl_s=cfg.output.lease_ttl_s)
    lease.check()  # a second writer is refused before it plans
    jobs = list_inputs(cfg)
    if note := scores_note(cfg):
        log.warning(note)
    with ray_session(address, cfg.ray, quiet=quiet):
        # Indexed once into the object store (the driver holds block references): an input error exits before
        # anything is created under the output, and the four passes below read the listing, not the tars.
        plan = index_inputs(jobs)
        claim(cfg.output.path, "filter")  # the marker first, before the lease file or anything else
        claim(cfg.embeddings_path(), "embeddings")
        with lease:
            return _with_embeddings_lease(cfg, plan, quiet=quiet, retry_failed=retry_failed)


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

    from pipeline.filter.decide import decisions_dataset, removed_by

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
    # Counted and recorded for `stylegen status OUTPUT` (embedding rows, then index rows), shown unless quiet.
    progress = ProgressReporter(store, n_todo, display=None if quiet else "auto", command="filter",
                                total=planned) if n_todo else None
    if progress is not None:
        if n_embed:
            progress.embedding(emb_store, n_embed)
        progress.start()
    state = "stopped"
    try:
        if n_embed:
            if emb_held is not None:
                raise emb_held
            emb_store.write_json("_model.json", {"clip": model_id})
            ds = to_embed.repartition(target_num_rows_per_block=sc.batch_size).map_batches(
                Embedder, batch_format="pyarrow", batch_size=sc.batch_size,
                compute=ActorPoolStrategy(min_size=sc.actors[0], max_size=sc.actors[1]),
                fn_constructor_kwargs={"scoring": sc.model_dump(), "decode": cfg.decode.model_dump()},
                num_cpus=sc.num_cpus, **gpu_args(sc.num_gpus))
            guard(ds, cfg.ray.stall_timeout_s)
            with StallWatch(cfg.ray.stall_timeout_s, [Pool("scoring", sc.num_cpus, sc.num_gpus, sc.actors)]):
                ds.write_datasink(TableDatasink(cfg.embeddings_path(), out.fsync, EMB_SCHEMA))
        summary.timings["embed_s"] = round(time.time() - started, 3)
        if progress is not None:
            progress.writing()
        if n_todo:
            decided = decisions_dataset(plan, planned, emb_store, cfg.filter.model_dump(),
                                        sc.heads_dump()).materialize()
            removed = removed_by(decided)
            todo = todo_dataset(decided, store, before, out.samples_per_shard)
            todo.repartition(target_num_rows_per_block=out.samples_per_shard).write_datasink(
                ShardDatasink(out.model_dump(), make_sample=copy_members))
        state = "finished"
    finally:
        if progress is not None:
            progress.stop(state)
    dataset = tally(cfg, store, summary, set(before), n_todo, plan)
    summary.timings["total_s"] = round(time.time() - started, 3)
    store.write_json("run.json", run_record(
        cfg, summary, dataset, kind="filter", filter_hash=cfg.filter_hash(),
        counters={"clip_images_encoded": n_embed, "embeddings_reused": planned - n_embed},
        removed_by=removed if removed is not None else (previous or {}).get("removed_by")))
    return summary
