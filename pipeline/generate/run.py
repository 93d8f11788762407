"""Build and execute one run: plan, skip done work, stream the Ray Data stages into the sink, summarise.

Rerunning the same config resumes: keys already in the index are skipped, orphans from a crash are
removed first, and the counts of this run plus the totals of the dataset go to ``run.json``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from dataclasses import dataclass

from pipeline.config import RunConfig
from pipeline.generate.failures import stop_reason
from pipeline.output.card import write_card
from pipeline.output.integrity import open_output
from pipeline.output.lease import Lease
from pipeline.output.ownership import check_overlap, check_owned, claim
from pipeline.output.progress import ProgressReporter
from pipeline.output.record import RunSummary, package_versions, run_record, scores_note, tally
from pipeline.output.resume import todo_dataset
from pipeline.output.sink import ShardDatasink
from pipeline.output.store import OutputStore
from pipeline.plan.dataset import SAMPLE_COLUMNS, SMALL_PLAN, list_sources, plan_dataset
from pipeline.redact import public_config
from pipeline.session import configure_data_context, gpu_args, ray_session
from pipeline.stall import Pool, StallWatch, guard

log = logging.getLogger(__name__)


def cpu_threads_warning(config: RunConfig, cores: int | None) -> str | None:
    """The warning for an embedded run whose CPU-only actor pools ask for more threads than the machine has cores.

    Ray gives an actor ``OMP_NUM_THREADS = num_cpus``, and the embedded Ray declares at least 4 logical CPUs so
    that tasks fit beside the actors; two torch pools at ``num_cpus: 2`` on 2 cores then run 4 busy threads on 2
    cores, and spin-waiting threads cost more than the overlap gains (benchmarks/bench_pipeline.py, sissi: 0.63 of
    a bare loop with 2+2 threads, 1.12 with the default 1+1)."""
    pools = [(name, pool) for name, pool in (("operator", config.operator), ("scoring", config.scoring))
             if pool.num_gpus == 0]
    threads = sum(pool.actors[1] * pool.num_cpus for _, pool in pools)
    if not cores or threads <= cores:
        return None
    asked = ", ".join(f"{name}: {pool.actors[1]} x num_cpus {pool.num_cpus:g}" for name, pool in pools)
    return (f"the CPU actor pools ask for {threads:g} threads on {cores} cores ({asked}); expect them to slow each "
            "other down: lower num_cpus or actors")


def feeding_args(num_gpus: float) -> dict:
    """How a GPU actor pool keeps its devices busy: two calls per actor run at once (Ray Data threads), so one
    batch's CPU work overlaps the other's device work (``Stylizer.device_lock`` keeps the device to one call at
    a time). A CPU-only actor has no device to keep busy: a second thread would only contend for its cores."""
    if num_gpus <= 0:
        return {}
    return {"max_concurrent_calls_per_actor": 2, "enable_true_multi_threading": True}


def execute(config: RunConfig, todo, quiet: bool = False) -> None:
    """Stream the ``todo`` dataset through decode -> stylize -> score/filter -> sink on the current Ray cluster; a
    failure storm or a device that kept dying raises :class:`~pipeline.generate.failures.RunStopped`."""
    from ray.data import ActorPoolStrategy

    from pipeline.generate.stages import Scorer, Stylizer, decode_batch

    configure_data_context(config.ray.wait_for_actors_s, quiet)
    op, sc = config.operator, config.scoring
    # One block per operator batch so that decoding runs in parallel and every stylize actor gets work at once.
    ds = todo.select_columns(SAMPLE_COLUMNS).repartition(target_num_rows_per_block=op.batch_size)
    # batch_size=None: decode block by block, keeping one block per operator batch.
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"decode": config.decode.model_dump()})
    with warnings.catch_warnings():
        # Ray 2.60's map_batches has no named parameter for max_restarts: it goes in ray_remote_args, which warns
        # "deprecated, removed in Ray 2.64" (revisit with that upgrade); the warning would only be noise on stderr.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        ds = ds.map_batches(
            Stylizer,
            batch_format="pyarrow",
            batch_size=op.batch_size,
            compute=ActorPoolStrategy(min_size=op.actors[0], max_size=op.actors[1],
                                     **feeding_args(op.num_gpus)),
            fn_constructor_kwargs={"operator": op.model_dump(), "output": config.output.model_dump()},
            num_cpus=op.num_cpus,
            # Ray Data restarts a dead actor up to max_restarts times (its default: forever) and retries the actor's
            # tasks on the new process (max_task_retries -1 while restarts remain): a poisoned device exits its
            # process, so this bounds how often a device that keeps dying is replaced.
            max_restarts=op.max_restarts,
            **gpu_args(op.num_gpus),
        )
    ds = ds.map_batches(
        Scorer,
        batch_format="pyarrow",
        batch_size=sc.batch_size,
        compute=ActorPoolStrategy(min_size=sc.actors[0], max_size=sc.actors[1]),
        fn_constructor_kwargs={"scoring": sc.model_dump(), "filter": config.filter.model_dump(),
                               "include_inputs": config.output.include_inputs},
        num_cpus=sc.num_cpus,
        **gpu_args(sc.num_gpus),
    )
    guard(ds, config.ray.stall_timeout_s)
    try:
        ds.write_datasink(ShardDatasink(config.output.model_dump()))
    except Exception as exc:
        stopped = stop_reason(exc, op.max_restarts)
        if stopped is None:
            raise
        raise stopped from None


def stall_pools(config: RunConfig) -> list[Pool]:
    """The actor pools of a run, as a stall's line names them."""
    return [Pool(name, pool.num_cpus, pool.num_gpus, pool.actors)
            for name, pool in (("operator", config.operator), ("scoring", config.scoring))]


def source_specs(config: RunConfig) -> list[tuple[str, str | None]]:
    return [("content.prompts", config.content.prompts), ("content.images", config.content.images),
            ("style.images", config.style.images)]


def run(config: RunConfig, *, address: str | None = None, quiet: bool = False,
        retry_failed: str | None = None) -> RunSummary:
    """Run (or resume) the configured job under the output's writer lease and return its summary; ``run.json``
    records it. ``retry_failed`` re-plans failed samples (those whose reason contains it; "" for all)."""
    started = time.time()
    check_owned(config.output.path)  # a folder stylegen did not make is refused before anything is read
    check_overlap(config.output.path, source_specs(config))
    lease = Lease(config.output.path, ttl_s=config.output.lease_ttl_s)
    lease.check()  # a second writer is refused before it plans
    listing = list_sources(config)  # read-only: a source error exits before anything is created under the output
    if note := scores_note(config):
        log.warning(note)
    warn = functools.partial(cpu_threads_warning, config, os.cpu_count())
    with ray_session(address, config.ray, quiet=quiet, embedded_warning=warn):
        plan = plan_dataset(config, listing)
        claim(config.output.path, "run")  # the marker first, before the lease file or anything else
        with lease:
            return _run(config, plan, started, quiet=quiet, retry_failed=retry_failed)


def _run(config: RunConfig, plan, started: float, *, quiet: bool, retry_failed: str | None) -> RunSummary:
    store = OutputStore(config.output.path, fsync=config.output.fsync)
    opened = open_output(store, retry_failed)
    before = store.index_files()
    planned = plan.count()
    todo = todo_dataset(plan, store, before, config.output.samples_per_shard)
    if before and planned <= SMALL_PLAN:
        todo = todo.materialize()  # counted and executed from the object store, not computed twice
    n_todo = todo.count() if before else planned
    summary = RunSummary(planned=planned, skipped=planned - n_todo, **opened)
    summary.timings["plan_s"] = round(time.time() - started, 3)
    if n_todo:
        write_card(store, {"config": public_config(config), "operator_hash": config.operator_hash(),
                           "versions": package_versions(), "dataset": {"planned": planned}}, in_progress=True)
        # Always counted and recorded (``stylegen status OUTPUT``); shown unless quiet.
        progress = ProgressReporter(store, n_todo, display=None if quiet else "auto", total=planned).start()
        state = "stopped"
        try:
            t0 = time.time()
            with StallWatch(config.ray.stall_timeout_s, stall_pools(config)):
                execute(config, todo, quiet=quiet)
            summary.timings["execute_s"] = round(time.time() - t0, 3)
            state = "finished"
        finally:
            progress.stop(state)
    dataset = tally(config, store, summary, set(before), n_todo, plan)
    summary.timings["total_s"] = round(time.time() - started, 3)
    record = run_record(config, summary, dataset, operator_hash=config.operator_hash())
    store.write_json("run.json", record)
    write_card(store, record)
    return summary


@dataclass
class PlanSummary:
    planned: int
    todo: int
    written: str | None = None

    def line(self) -> str:
        return f"planned={self.planned} todo={self.todo}"


def plan_only(config: RunConfig, *, address: str | None = None, quiet: bool = False,
              retry_failed: str | None = None, out: str | None = None) -> PlanSummary:
    """Build the plan on Ray and count what a run would do now (read-only: no lease, nothing written under the
    output); with ``out``, write the plan there as parquet, in plan order."""
    from pipeline.io.fs import arrow_fs, get_fs
    from pipeline.io.sources import SourceError

    if out is not None:
        fs, path = get_fs(out)
        if fs.exists(path) and (not fs.isdir(path) or fs.ls(path)):
            raise SourceError(f"--out: {out} exists; give a new folder")
    listing = list_sources(config)
    warn = functools.partial(cpu_threads_warning, config, os.cpu_count())
    with ray_session(address, config.ray, quiet=quiet, embedded_warning=warn):
        plan = plan_dataset(config, listing)
        store = OutputStore(config.output.path, fsync=False)
        index_files = store.index_files()
        planned = plan.count()
        todo = todo_dataset(plan, store, index_files, config.output.samples_per_shard).count() if index_files \
            else planned
        if out is not None:
            from ray.data import DataContext

            DataContext.get_current().execution_options.preserve_order = True
            plan.map_batches(public_plan, batch_format="pyarrow", batch_size=None).write_parquet(
                path, filesystem=arrow_fs(fs))
        return PlanSummary(planned, todo, out)


def public_plan(batch):
    """A plan block as ``plan --out`` stores it: ids, source URLs and errors without URL credentials or secret
    values (a plain URL stays byte for byte)."""
    import pyarrow as pa

    from pipeline.redact import redact_text

    for name in ("content_id", "style_id", "content_url", "style_url", "error"):
        if name in batch.column_names:
            column = pa.array([redact_text(v) for v in batch.column(name).to_pylist()], batch.schema.field(name).type)
            batch = batch.set_column(batch.schema.get_field_index(name), name, column)
    return batch
