"""Deterministic pairing of content x style x seed into planned samples with stable keys (docs/architecture.md §2).

The same sources and config always give the same plan, in the same order, with the same keys, so a rerun
can subtract the keys already in the index and do only what is left.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch

from pipeline.config import RunConfig
from pipeline.io.fs import is_remote
from pipeline.io.sources import SourceItem, read_content, read_images


@dataclass(frozen=True)
class PlannedSample:
    key: str
    content_id: str
    style_id: str
    seed: int
    prompt: str | None
    content_url: str | None
    content_offset: int
    content_size: int
    style_url: str
    style_offset: int
    style_size: int
    error: str | None = None

    def to_row(self) -> dict:
        return asdict(self)


def _int_hash(*parts: object) -> int:
    digest = hashlib.sha1("\x00".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def sample_key(content_id: str, style_id: str, seed: int, operator_hash: str) -> str:
    """``sha1(content_id, style_id, seed, operator-config-hash)[:16]``: hex, safe as a file name."""
    blob = "\x00".join((content_id, style_id, str(seed), operator_hash)).encode("utf-8")
    return hashlib.sha1(blob).hexdigest()[:16]


def choose_styles(content_id: str, n_styles: int, k: int, seed: int) -> list[int]:
    """k distinct style indices for one content item, drawn from a generator seeded by (seed, content).

    Seeding per content item (not by position) keeps a content item's styles stable when other
    content items are added or removed.
    """
    k = min(k, n_styles)
    gen = torch.Generator().manual_seed(_int_hash(seed, content_id))
    if k * 4 >= n_styles:
        return torch.randperm(n_styles, generator=gen)[:k].tolist()
    chosen: list[int] = []
    seen: set[int] = set()
    while len(chosen) < k:
        for idx in torch.randint(n_styles, (2 * k,), generator=gen).tolist():
            if idx not in seen:
                seen.add(idx)
                chosen.append(idx)
                if len(chosen) == k:
                    break
    return chosen


def pair_content(content: SourceItem, styles: list[SourceItem], *, styles_per_content: int, seeds_per_pair: int,
                 seed: int, operator_hash: str) -> list[PlannedSample]:
    """The samples of one content item, in plan order: its styles from the generator seeded by
    ``(seed, content id)``, then ``seeds_per_pair`` seeds each. Used in the driver and on workers alike."""
    samples: list[PlannedSample] = []
    seen: set[str] = set()
    c_ref = content.image
    for s_index in choose_styles(content.id, len(styles), styles_per_content, seed):
        style = styles[s_index]
        s_ref = style.image
        errors = [f"content: {content.error}" if content.error else None,
                  f"style: {style.error}" if style.error else None]
        for rep in range(seeds_per_pair):
            sample_seed = _int_hash(seed, content.id, style.id, rep) % (2**31)
            key = sample_key(content.id, style.id, sample_seed, operator_hash)
            if key in seen:
                continue
            seen.add(key)
            samples.append(
                PlannedSample(
                    key=key,
                    content_id=content.id,
                    style_id=style.id,
                    seed=sample_seed,
                    prompt=content.prompt,
                    content_url=c_ref.url if c_ref else None,
                    content_offset=c_ref.offset if c_ref else 0,
                    content_size=c_ref.size if c_ref else -1,
                    style_url=s_ref.url if s_ref else "",
                    style_offset=s_ref.offset if s_ref else 0,
                    style_size=s_ref.size if s_ref else -1,
                    error="; ".join(e for e in errors if e) or None,
                )
            )
    return samples


def pair(
    contents: list[SourceItem],
    styles: list[SourceItem],
    *,
    styles_per_content: int,
    seeds_per_pair: int,
    seed: int,
    operator_hash: str,
    limit: int | None = None,
) -> list[PlannedSample]:
    plan: list[PlannedSample] = []
    if limit == 0:
        return plan
    seen: set[str] = set()  # content ids are unique, so keys are too; kept as a guard against hash collisions
    for content in contents:
        for sample in pair_content(content, styles, styles_per_content=styles_per_content,
                                   seeds_per_pair=seeds_per_pair, seed=seed, operator_hash=operator_hash):
            if sample.key in seen:
                continue
            seen.add(sample.key)
            plan.append(sample)
            if limit is not None and len(plan) >= limit:
                return plan
    return plan


def build_plan(config: RunConfig) -> list[PlannedSample]:
    """Read the sources (metadata only) and pair them as the config says.

    A local output folder is excluded from the source listings: with ``output.path`` inside a style or content
    folder, a rerun would otherwise take its own shards and report images as inputs."""
    exclude = [] if is_remote(config.output.path) else [config.output.path.removeprefix("file://")]
    contents = read_content(config.content.prompts, config.content.images, exclude=exclude, policy=config.sources)
    styles = read_images(config.style.images, "style.images", exclude=exclude, policy=config.sources)
    p = config.pairing
    return pair(
        contents,
        styles,
        styles_per_content=p.styles_per_content,
        seeds_per_pair=p.seeds_per_pair,
        seed=p.seed,
        operator_hash=config.operator_hash(),
        limit=p.limit,
    )
