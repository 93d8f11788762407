"""Build and execute one run: plan, skip done work, stream the Ray Data stages into the sink, summarise.

Rerunning the same config resumes: keys already in the index are skipped, orphans from a crash are
removed first, and the counts of this run plus the totals of the dataset go to ``run.json``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import pyarrow.compute as pc

from pipeline.card import write_card
from pipeline.config import RunConfig
from pipeline.integrity import failed_mask, startup_repair, supersede
from pipeline.lease import Lease
from pipeline.ownership import check_overlap, check_owned, claim
from pipeline.plan_dataset import SAMPLE_COLUMNS, SMALL_PLAN, list_sources, plan_dataset
from pipeline.progress import ProgressReporter
from pipeline.redact import (
    REDACTED,
    SECRET_ENV,
    apply_secret_env,
    public_config,
    register_secrets,
    restore_env,
    secret_env,
)
from pipeline.resume import status_totals, todo_dataset
from pipeline.sink import OutputStore, ShardDatasink

log = logging.getLogger(__name__)

VERSIONED = ("stylegen", "torch", "ray", "diffusers", "transformers", "open-clip-torch", "webdataset",
             "pyarrow", "fsspec", "s3fs", "pillow")


@dataclass
class RunSummary:
    planned: int
    kept: int = 0
    rejected: int = 0
    failed: int = 0
    skipped: int = 0
    orphans_removed: int = 0
    repaired: int = 0  # damaged files found at start-up and quarantined (their samples redone)
    retried: int = 0  # failed rows superseded by --retry-failed
    timings: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        return (f"planned={self.planned} kept={self.kept} rejected={self.rejected} "
                f"failed={self.failed} skipped={self.skipped}")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def init_ray(address: str | None, quiet: bool = False, runtime_env: dict[str, Any] | None = None) -> bool:
    """Connect to ``address`` or start an embedded local Ray; return True if this call started it.

    The ``env_vars`` of ``runtime_env`` (the config's ``ray.runtime_env``) reach every worker; their values are
    secrets, so they are never logged, and values already redacted (``***``: in a submitted job, which has the
    real ones from its own runtime_env) are not applied."""
    import ray

    env_vars = {k: v for k, v in secret_env({"ray": {"runtime_env": runtime_env or {}}}).items() if v != REDACTED}
    register_secrets(env_vars.values())
    if ray.is_initialized():
        return False
    main = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        _ray_init(address, quiet, env_vars)
    finally:  # ray.init installs handlers of its own; the caller's (a clean stop on SIGTERM/SIGINT) win
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    return True


def _ray_init(address: str | None, quiet: bool, env_vars: dict[str, str]) -> None:
    import ray

    level = {"logging_level": logging.WARNING} if quiet else {}  # --quiet: no "Started a local Ray instance"
    if address:
        if env_vars:  # a cluster's workers get them through Ray's runtime_env
            names = ",".join(sorted(env_vars))
            level["runtime_env"] = {"env_vars": {**env_vars, SECRET_ENV: names}}
        ray.init(address=address, log_to_driver=not quiet, **level)
    else:
        # Logical CPUs only bound concurrency: the stylize and score actors each hold one, and the decode
        # and write tasks need room beside them even on a 2-core laptop.
        # address="local" always starts a private instance, never attaches to a `ray start` cluster that
        # happens to run on this machine.
        # The env vars are inherited by the local raylet (and so by every worker), not passed as a runtime_env
        # that Ray would write into its session logs; this process's environment is restored once Ray runs.
        previous = apply_secret_env(env_vars)
        try:
            ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=not quiet, **level)
        finally:
            restore_env(previous)


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


def _gpu_args(num_gpus: float) -> dict[str, float]:
    # Ray counts num_gpus=0 as a GPU request (ray#45201): only pass it when a GPU is wanted.
    return {"num_gpus": num_gpus} if num_gpus > 0 else {}


def configure_data_context(wait_for_actors_s: int, quiet: bool) -> None:
    """Ray Data settings every job shares: progress output, and waiting for each pool's minimum actors."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = not quiet
    ctx.print_on_execution_start = not quiet
    ctx.wait_for_min_actors_s = wait_for_actors_s


def tally(config: RunConfig, store: OutputStore, summary: RunSummary, before: set[str], todo: int,
          plan) -> dict[str, Any]:
    """Count this run's outcomes into ``summary`` from the index files it committed, and return the dataset
    totals over the planned keys (a join on the cluster). A sample of this run without an index row is an error
    (the invariant of docs/architecture.md §5). The driver reads status columns file by file, never a set of keys."""
    new = [p for p in store.index_files() if p not in before]
    for path in new:
        counts = pc.value_counts(store.read_parquet(path, ["status"]).column("status"))
        for status, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True):
            setattr(summary, status, getattr(summary, status) + n)
    written = summary.kept + summary.rejected + summary.failed
    if written != todo:
        raise RuntimeError(f"{todo - written} planned samples have no index row after the run")
    totals = status_totals(plan, store, store.index_files(), config.output.samples_per_shard)
    return {"planned": summary.planned, **totals, "complete": sum(totals.values()) == summary.planned}


def execute(config: RunConfig, todo, quiet: bool = False) -> None:
    """Stream the ``todo`` dataset through decode -> stylize -> score/filter -> sink on the current Ray cluster."""
    from ray.data import ActorPoolStrategy

    from pipeline.stages import Scorer, Stylizer, decode_batch

    configure_data_context(config.ray.wait_for_actors_s, quiet)
    op, sc = config.operator, config.scoring
    # One block per operator batch so that decoding runs in parallel and every stylize actor gets work at once.
    ds = todo.select_columns(SAMPLE_COLUMNS).repartition(target_num_rows_per_block=op.batch_size)
    # batch_size=None: decode block by block, keeping one block per operator batch.
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"decode": config.decode.model_dump()})
    ds = ds.map_batches(
        Stylizer,
        batch_format="pyarrow",
        batch_size=op.batch_size,
        compute=ActorPoolStrategy(min_size=op.actors[0], max_size=op.actors[1]),
        fn_constructor_kwargs={"operator": op.model_dump(), "output": config.output.model_dump()},
        num_cpus=op.num_cpus,
        **_gpu_args(op.num_gpus),
    )
    ds = ds.map_batches(
        Scorer,
        batch_format="pyarrow",
        batch_size=sc.batch_size,
        compute=ActorPoolStrategy(min_size=sc.actors[0], max_size=sc.actors[1]),
        fn_constructor_kwargs={"scoring": sc.model_dump(), "filter": config.filter.model_dump(),
                               "include_inputs": config.output.include_inputs},
        num_cpus=sc.num_cpus,
        **_gpu_args(sc.num_gpus),
    )
    ds.write_datasink(ShardDatasink(config.output.model_dump()))


def open_output(store: OutputStore, retry_failed: str | None) -> dict[str, int]:
    """Start-up under the lease: orphans and damage quarantined (never deleted), and with ``retry_failed`` (a
    reason substring, "" for all) the failed rows superseded so that their samples are planned again.
    ``orphans_removed`` counts the orphan shards moved to ``_quarantine/``."""
    store.prepare()
    orphans, repaired = startup_repair(store)
    counts = {"orphans_removed": orphans, "repaired": repaired, "retried": 0}
    if retry_failed is not None:
        counts["retried"] = len(supersede(store, "index", failed_mask(retry_failed)))
        log.info("retrying %d failed samples%s", counts["retried"],
                 f" whose reason contains {retry_failed!r}" if retry_failed else "")
    return counts


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
    started_ray = init_ray(address or config.ray.address, quiet=quiet, runtime_env=config.ray.runtime_env)
    embedded = started_ray and not (address or config.ray.address)
    warning = cpu_threads_warning(config, os.cpu_count()) if embedded else None
    if warning:
        log.warning(warning)
    try:
        configure_data_context(config.ray.wait_for_actors_s, quiet)
        plan = plan_dataset(config, listing)
        claim(config.output.path, "run")  # the marker first, before the lease file or anything else
        with lease:
            return _run(config, plan, started, quiet=quiet, retry_failed=retry_failed)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


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
        progress = None if quiet else ProgressReporter(store, n_todo).start()
        try:
            t0 = time.time()
            execute(config, todo, quiet=quiet)
            summary.timings["execute_s"] = round(time.time() - t0, 3)
        finally:
            if progress is not None:
                progress.stop()
    dataset = tally(config, store, summary, set(before), n_todo, plan)
    summary.timings["total_s"] = round(time.time() - started, 3)
    record = run_record(config, summary, dataset)
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
    from pipeline.fs import get_fs
    from pipeline.resume import arrow_fs
    from pipeline.sources import SourceError

    if out is not None:
        fs, path = get_fs(out)
        if fs.exists(path) and (not fs.isdir(path) or fs.ls(path)):
            raise SourceError(f"--out: {out} exists; give a new folder")
    listing = list_sources(config)
    started_ray = init_ray(address or config.ray.address, quiet=quiet, runtime_env=config.ray.runtime_env)
    embedded = started_ray and not (address or config.ray.address)
    warning = cpu_threads_warning(config, os.cpu_count()) if embedded else None
    if warning:
        log.warning(warning)
    try:
        configure_data_context(config.ray.wait_for_actors_s, quiet)
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
    finally:
        if started_ray:
            import ray

            ray.shutdown()


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


def run_record(config: RunConfig, summary: RunSummary, dataset: dict[str, int]) -> dict[str, Any]:
    from operators.clip_score import resolve_clip

    _, _, meaningful = resolve_clip(config.scoring.clip_model, config.scoring.clip_pretrained)
    return {
        "config": public_config(config),
        "operator_hash": config.operator_hash(),
        "versions": package_versions(),
        "this_run": asdict(summary),
        "dataset": dataset,
        "scores_meaningful": meaningful,
        "scores_note": None if meaningful else
        "CLIP weights are random (clip_pretrained: none or a tiny model): scores are meaningless",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
