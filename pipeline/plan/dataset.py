"""The plan as a Ray Dataset (docs/architecture.md §10): the driver lists files, workers read them and pair, and the
resume is an anti-join against the committed index, so the driver holds no per-sample state.

It makes exactly the plan of :func:`pipeline.plan.keys.build_plan` (the in-driver reference, kept for small jobs and
tests): the same keys, pairings, seeds and prompts, numbered in the same order by ``ordinal``. Three global rules of
the reference need care when content is read in pieces, each done without gathering the items:
- a repeated content id keeps its first occurrence: only manifests name their own ids, so only a source with a
  manifest among several files is checked, by a Ray groupby whose result (the repeats) is small;
- an image without a caption takes prompt ``i mod len(prompts)`` where ``i`` is its position among the images:
  positions are the per-file item counts (one number per file) summed in file order;
- ``limit`` keeps the first N samples in plan order: every content item has the same number of samples
  (``min(styles_per_content, styles) * seeds_per_pair``), so a sample's plan position is known where it is made.
The style catalogue (and the prompt pool of an image source) is read on workers too, then broadcast through the
object store; both are bounded (``MAX_STYLES``, ``MAX_PROMPT_POOL``) with a clear error above the bound.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import RunConfig
from pipeline.io.sources import (
    ImageRef,
    SourceError,
    SourceItem,
    SourceUnit,
    dedupe,
    list_image_units,
    list_prompt_units,
    output_exclusion,
    read_unit,
)
from pipeline.plan.keys import PlannedSample, pair_content
from pipeline.session import WorkerSourceError, run_step

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger(__name__)

MAX_STYLES = 1_000_000
MAX_PROMPT_POOL = 1_000_000
MAX_LIST_BLOCKS = 2_000  # blocks of the listing: enough for every worker, few enough for the scheduler
IMAGES_PER_BLOCK = 50_000  # listed image files per block (nothing to read: only ids and locations)
SMALL_PLAN = 500_000  # samples of a plan kept in the object store (~150 MB) instead of recomputed per pass
LOC_SHIFT = 32  # an item's location: unit << 32 | position in the unit (a unit holds < 2**32 items)

ITEM_SCHEMA = pa.schema([("unit", pa.int64()), ("pos", pa.int64()), ("loc", pa.int64()), ("id", pa.string()),
                         ("url", pa.string()), ("offset", pa.int64()), ("size", pa.int64()),
                         ("prompt", pa.string()), ("error", pa.string())])
_TYPES = {"key": pa.string(), "content_id": pa.string(), "style_id": pa.string(), "seed": pa.int64(),
          "prompt": pa.string(), "content_url": pa.string(), "content_offset": pa.int64(),
          "content_size": pa.int64(), "style_url": pa.string(), "style_offset": pa.int64(),
          "style_size": pa.int64(), "error": pa.string()}
SAMPLE_COLUMNS = [f.name for f in fields(PlannedSample)]
PLAN_SCHEMA = pa.schema([("ordinal", pa.int64()), *((name, _TYPES[name]) for name in SAMPLE_COLUMNS)])


def _read_units(batch: pa.Table) -> pa.Table:
    """Ray task: read a block of units into items (repeats inside one unit dropped here, keeping the first)."""
    cols: dict[str, list] = {name: [] for name in ITEM_SCHEMA.names}
    for unit in batch.to_pylist():
        index = unit.pop("unit")
        try:
            items = read_unit(SourceUnit(**unit))
        except SourceError as exc:
            raise WorkerSourceError(str(exc)) from None
        seen: set[str] = set()
        for pos, item in enumerate(items):
            if item.id in seen:
                log.warning("duplicate source id %r: keeping the first occurrence", item.id)
                continue
            seen.add(item.id)
            ref = item.image
            for name, value in (("unit", index), ("pos", pos), ("loc", index << LOC_SHIFT | pos), ("id", item.id),
                                ("url", ref.url if ref else None), ("offset", ref.offset if ref else 0),
                                ("size", ref.size if ref else -1), ("prompt", item.prompt), ("error", item.error)):
                cols[name].append(value)
    return pa.table(cols, schema=ITEM_SCHEMA)


def _items(units: list[SourceUnit]) -> Dataset:
    import ray

    rows = [{"unit": i, **asdict(u)} for i, u in enumerate(units)]
    # A tar, manifest or prompt list is read (a task each, up to the cap); an image unit costs nothing to "read".
    reads = sum(u.kind != "image" for u in units) + -(-sum(u.kind == "image" for u in units) // IMAGES_PER_BLOCK)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), reads, MAX_LIST_BLOCKS)))
    return ds.map_batches(_read_units, batch_format="pyarrow", batch_size=None)


def _to_source_items(table: pa.Table) -> list[SourceItem]:
    return [SourceItem(id=r["id"], image=ImageRef(r["url"], r["offset"], r["size"]) if r["url"] else None,
                       prompt=r["prompt"], error=r["error"]) for r in table.to_pylist()]


def _gather(units: list[SourceUnit], key: str, spec: str, bound: int, what: str) -> list[SourceItem]:
    """A bounded source (styles, a prompt pool) read on workers and gathered, in file order."""
    table = _arrow(run_step(lambda: _items(units).materialize(), what), ITEM_SCHEMA).sort_by("loc")
    if table.num_rows > bound:
        raise SourceError(f"{key}: {spec} has {table.num_rows} {what}, more than the {bound} this version can "
                          f"broadcast to every worker")
    return _to_source_items(table)


def _repeats(items: Dataset, units: list[SourceUnit]) -> list[int]:
    """Locations of repeated ids that are not their first occurrence (sorted); empty when none can exist."""
    if len(units) < 2 or not any(u.may_repeat_ids for u in units):
        return []
    from ray.data.aggregate import Count, Min

    grouped = items.select_columns(["id", "loc"]).groupby("id").aggregate(Count(), Min("loc"))
    first = {r["id"]: r["min(loc)"] for r in grouped.filter(fn=lambda r: r["count()"] > 1).take_all()}
    if not first:
        return []
    for name in sorted(first)[:20]:
        log.warning("duplicate source id %r: keeping the first occurrence", name)
    if len(first) > 20:
        log.warning("... and %d more duplicate source ids", len(first) - 20)
    repeats = items.select_columns(["id", "loc"]).filter(fn=lambda r: r["id"] in first and r["loc"] != first[r["id"]])
    return sorted(r["loc"] for r in repeats.take_all())


def _unit_counts(batch: pa.Table) -> pa.Table:
    counts = pc.value_counts(batch.column("unit"))
    return pa.table({"unit": counts.field("values"), "n": counts.field("counts")})


def _bases(items: Dataset, n_units: int, dropped: list[int]) -> list[int]:
    """Each unit's first item position among all items (after repeats are dropped): per-file numbers only."""
    per_unit = [0] * n_units
    for row in items.select_columns(["unit"]).map_batches(_unit_counts, batch_format="pyarrow",
                                                         batch_size=None).take_all():
        per_unit[row["unit"]] += row["n"]
    for unit, n in Counter(loc >> LOC_SHIFT for loc in dropped).items():
        per_unit[unit] -= n
    bases, total = [], 0
    for n in per_unit:
        bases.append(total)
        total += n
    return bases


class _PairContext:
    """What every pairing task needs, broadcast once through the object store."""

    def __init__(self, styles: list[SourceItem], pool: list[str] | None, bases: list[int], dropped: list[int],
                 config: RunConfig):
        p = config.pairing
        self.styles, self.pool, self.bases, self.dropped = styles, pool, bases, dropped
        self.options = {"styles_per_content": p.styles_per_content, "seeds_per_pair": p.seeds_per_pair,
                        "seed": p.seed, "operator_hash": config.operator_hash()}
        self.per_content = min(p.styles_per_content, len(styles)) * p.seeds_per_pair
        self.limit = p.limit


_CONTEXTS: dict[str, _PairContext] = {}  # per worker process: one ray.get per plan, not per block


def _context(ref) -> _PairContext:
    import ray

    name = ref.hex()
    if name not in _CONTEXTS:
        _CONTEXTS.clear()
        _CONTEXTS[name] = ray.get(ref)
    return _CONTEXTS[name]


def _pair_items(batch: pa.Table, context_ref: list) -> pa.Table:
    """Ray task: the samples of a block of content items, each with its position in the plan."""
    ctx = _context(context_ref[0])
    cols: dict[str, list] = {name: [] for name in PLAN_SCHEMA.names}
    for row in batch.to_pylist():
        loc = row["loc"]
        if ctx.dropped and _contains(ctx.dropped, loc):
            continue
        unit = loc >> LOC_SHIFT
        unit_start = unit << LOC_SHIFT
        skipped_before = bisect.bisect_left(ctx.dropped, loc) - bisect.bisect_left(ctx.dropped, unit_start)
        position = ctx.bases[unit] + row["pos"] - skipped_before
        first = position * ctx.per_content
        if ctx.limit is not None and first >= ctx.limit:
            continue
        prompt = row["prompt"]
        if ctx.pool and not prompt:
            prompt = ctx.pool[position % len(ctx.pool)]
        ref = ImageRef(row["url"], row["offset"], row["size"]) if row["url"] else None
        content = SourceItem(id=row["id"], image=ref, prompt=prompt, error=row["error"])
        for j, sample in enumerate(pair_content(content, ctx.styles, **ctx.options)):
            if ctx.limit is not None and first + j >= ctx.limit:
                break
            cols["ordinal"].append(first + j)
            for name in SAMPLE_COLUMNS:
                cols[name].append(getattr(sample, name))
    return pa.table(cols, schema=PLAN_SCHEMA)


def _contains(sorted_list: list[int], value: int) -> bool:
    i = bisect.bisect_left(sorted_list, value)
    return i < len(sorted_list) and sorted_list[i] == value


@dataclass(frozen=True)
class Listing:
    """The files of a run's sources, listed in the driver (paths only, no Ray needed): the plan's input."""

    content: list[SourceUnit]
    content_key: str
    content_spec: str
    prompts: list[SourceUnit] | None  # the prompt pool of an image content source
    styles: list[SourceUnit]


def list_sources(config: RunConfig) -> Listing:
    """List every source file; a missing or unreadable source is a SourceError before Ray starts."""
    exclude = output_exclusion(config.output.path)
    content, policy = config.content, config.sources
    pool = None
    if content.images:
        units = list_image_units(content.images, "content.images", exclude=exclude, policy=policy)
        key, spec = "content.images", content.images
        if content.prompts:
            pool = list_prompt_units(content.prompts, "content.prompts", exclude=exclude, policy=policy)
    else:
        units = list_prompt_units(content.prompts, "content.prompts", exclude=exclude, policy=policy)
        key, spec = "content.prompts", content.prompts
    styles = list_image_units(config.style.images, "style.images", exclude=exclude, policy=policy)
    return Listing(units, key, spec, pool, styles)


def plan_dataset(config: RunConfig, listing: Listing | None = None) -> Dataset:
    """The plan of ``config`` as a Ray Dataset of :data:`PLAN_SCHEMA` rows (needs Ray initialised). Source errors
    are raised here as :class:`SourceError`, before anything is written."""
    import ray

    listing = listing or list_sources(config)
    content = config.content
    pool = None
    if listing.prompts is not None:
        prompts = _gather(listing.prompts, "content.prompts", content.prompts, MAX_PROMPT_POOL, "prompts")
        if not prompts:
            raise SourceError(f"content.prompts: no prompts in {content.prompts}")
        pool = [p.prompt for p in prompts if p.prompt] or None
    units = listing.content
    items = run_step(lambda: _items(units).materialize(), "content")
    if items.count() == 0:
        what = "images" if listing.content_key == "content.images" else "prompts"
        raise SourceError(f"{listing.content_key}: no {what} in {listing.content_spec}")
    styles = _gather(listing.styles, "style.images", config.style.images, MAX_STYLES, "styles")
    styles = dedupe(styles)
    if not styles:
        raise SourceError(f"style.images: no images in {config.style.images}")
    dropped = run_step(lambda: _repeats(items, units), "content")
    bases = _bases(items, len(units), dropped)
    if config.pairing.limit == 0:
        return ray.data.from_arrow(PLAN_SCHEMA.empty_table())
    ctx = _PairContext(styles, pool, bases, dropped, config)
    context = ray.put(ctx)
    # The ref travels inside a list: Ray Data would otherwise resolve it into every task's arguments.
    plan = items.map_batches(_pair_items, batch_format="pyarrow", batch_size=None,
                             fn_kwargs={"context_ref": [context]})
    at_most = (items.count() - len(dropped)) * ctx.per_content
    if at_most <= SMALL_PLAN:  # held in the object store: counting and resuming it costs no new pass
        return run_step(plan.materialize, "content")
    return plan


def rows_to_samples(table: pa.Table) -> list[PlannedSample]:
    """Plan rows (in ordinal order) as PlannedSamples: for tests and small plans only."""
    table = table.sort_by("ordinal")
    return [PlannedSample(**{k: r[k] for k in SAMPLE_COLUMNS}) for r in table.to_pylist()]


def collect(ds: Dataset) -> list[PlannedSample]:
    return rows_to_samples(_arrow(ds, PLAN_SCHEMA))


def _arrow(ds: Dataset, schema: pa.Schema) -> pa.Table:
    import ray

    return pa.concat_tables([schema.empty_table(), *ray.get(ds.to_arrow_refs())])
