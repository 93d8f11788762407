"""pipeline.plan.keys: deterministic content x style x seed pairing with stable keys (docs/architecture.md §2)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import pytest

from pipeline.config import validate_config
from pipeline.io.sources import ImageRef, SourceItem
from pipeline.plan.keys import build_plan, pair
from tests.unit_helpers import DEMO

HEX16 = re.compile(r"^[0-9a-f]{16}$")


def contents(n: int, prefix: str = "c") -> list[SourceItem]:
    return [SourceItem(id=f"{prefix}{i}", prompt=f"prompt {i}") for i in range(n)]


def styles(n: int) -> list[SourceItem]:
    return [SourceItem(id=f"s{i}.png", image=ImageRef(f"/styles/s{i}.png")) for i in range(n)]


def make(cs, ss, k=1, seeds=1, seed=0, op="0123456789abcdef", limit=None):
    return pair(cs, ss, styles_per_content=k, seeds_per_pair=seeds, seed=seed, operator_hash=op, limit=limit)


def styles_by_content(plan) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for s in plan:
        if s.style_id not in out[s.content_id]:
            out[s.content_id].append(s.style_id)
    return out


def test_same_inputs_give_identical_plan():
    a = make(contents(7), styles(9), k=3, seeds=2, seed=11)
    b = make(contents(7), styles(9), k=3, seeds=2, seed=11)
    assert [s.to_row() for s in a] == [s.to_row() for s in b]
    assert len(a) == 7 * 3 * 2


def test_keys_are_16_hex_and_unique():
    plan = make(contents(10), styles(6), k=4, seeds=3)
    assert all(HEX16.match(s.key) for s in plan)
    assert len({s.key for s in plan}) == len(plan)


@pytest.mark.parametrize(("n_styles", "k"), [(5, 1), (5, 3), (5, 5), (5, 12), (200, 3), (1000, 7), (1, 4)])
def test_styles_per_content_are_distinct_and_exactly_min_k_n(n_styles, k):
    plan = make(contents(12), styles(n_styles), k=k)
    chosen = styles_by_content(plan)
    assert set(chosen) == {f"c{i}" for i in range(12)}
    for content_id in chosen:
        per_content = [s.style_id for s in plan if s.content_id == content_id]
        assert len(per_content) == min(k, n_styles), content_id
        assert len(set(per_content)) == len(per_content)


def test_style_choice_varies_between_content_items():
    # With 1 of 50 styles each, 40 content items that all picked the same style would mean no pairing at all.
    chosen = styles_by_content(make(contents(40), styles(50), k=1))
    assert len({tuple(v) for v in chosen.values()}) > 10


def test_seeds_per_pair_multiplies_with_distinct_seeds():
    single = make(contents(5), styles(8), k=2, seeds=1)
    triple = make(contents(5), styles(8), k=2, seeds=3)
    assert len(triple) == 3 * len(single)
    per_pair = Counter((s.content_id, s.style_id) for s in triple)
    assert set(per_pair.values()) == {3}
    for pair_ids in per_pair:
        seeds = [s.seed for s in triple if (s.content_id, s.style_id) == pair_ids]
        assert len(set(seeds)) == 3
        assert all(0 <= x < 2**31 for x in seeds)
    # more seeds never change which styles a content item gets
    assert styles_by_content(single) == styles_by_content(triple)


def test_global_seed_changes_pairing_and_seeds():
    a = make(contents(20), styles(30), k=2, seed=0)
    b = make(contents(20), styles(30), k=2, seed=1)
    assert [s.key for s in a] != [s.key for s in b]
    assert styles_by_content(a) != styles_by_content(b)


def test_limit_truncates_to_a_prefix():
    full = make(contents(6), styles(4), k=2, seeds=2)
    limited = make(contents(6), styles(4), k=2, seeds=2, limit=5)
    assert [s.key for s in limited] == [s.key for s in full[:5]]
    assert len(make(contents(6), styles(4), k=2, seeds=2, limit=10_000)) == len(full)


def test_limit_zero_plans_nothing():
    assert make(contents(3), styles(3), limit=0) == []


def test_content_styles_do_not_depend_on_other_content_items():
    alone = styles_by_content(make([SourceItem(id="target", prompt="x")], styles(40), k=3, seed=5))
    crowd = contents(15, "a") + [SourceItem(id="target", prompt="x")] + contents(15, "z")
    crowded = styles_by_content(make(crowd, styles(40), k=3, seed=5))
    assert crowded["target"] == alone["target"]
    alone_keys = {s.key for s in make([SourceItem(id="target", prompt="x")], styles(40), k=3, seed=5)}
    crowd_keys = {s.key for s in make(crowd, styles(40), k=3, seed=5) if s.content_id == "target"}
    assert alone_keys == crowd_keys


def test_operator_hash_changes_keys_but_not_pairing():
    a = make(contents(5), styles(5), k=2, op="aaaaaaaaaaaaaaaa")
    b = make(contents(5), styles(5), k=2, op="bbbbbbbbbbbbbbbb")
    assert [(s.content_id, s.style_id, s.seed) for s in a] == [(s.content_id, s.style_id, s.seed) for s in b]
    assert not {s.key for s in a} & {s.key for s in b}


def test_planned_rows_carry_refs_prompts_and_errors():
    cs = [SourceItem(id="img", image=ImageRef("/c/img.tar", 512, 100), prompt="a cat"),
          SourceItem(id="bad", image=None, prompt="p", error="broken")]
    ss = [SourceItem(id="s", image=ImageRef("/s/s.tar", 1024, 77)),
          SourceItem(id="t", image=None, error="tar sample has no image member")]
    plan = make(cs, ss, k=2)
    assert len(plan) == 4
    for s in plan:
        row = s.to_row()
        if s.content_id == "img":
            assert (row["content_url"], row["content_offset"], row["content_size"]) == ("/c/img.tar", 512, 100)
            assert row["prompt"] == "a cat"
        else:
            assert row["content_url"] is None
            assert row["error"] and "content: broken" in row["error"]
        if s.style_id == "s":
            assert (row["style_url"], row["style_offset"], row["style_size"]) == ("/s/s.tar", 1024, 77)
        else:
            assert row["error"] and row["error"].count("style:") == 1
    assert [s.error for s in plan if (s.content_id, s.style_id) == ("img", "s")] == [None]


def test_build_plan_from_demo_config_is_stable():
    data = {
        "output": {"path": "unused"},
        "content": {"images": str(DEMO / "captions.jsonl")},
        "style": {"images": str(DEMO / "style")},
        "pairing": {"styles_per_content": 2, "seeds_per_pair": 2, "seed": 3},
    }
    cfg = validate_config(data)
    plan = build_plan(cfg)
    n_content = sum(1 for line in (DEMO / "captions.jsonl").read_text().splitlines() if line.strip())
    n_styles = len([p for p in (DEMO / "style").iterdir() if p.suffix == ".png"])
    assert len(plan) == n_content * min(2, n_styles) * 2
    assert [s.key for s in build_plan(cfg)] == [s.key for s in plan]
    other = validate_config(dict(data, operator={"name": "color-transfer", "params": {"strength": 0.3}}))
    assert not {s.key for s in build_plan(other)} & {s.key for s in plan}
    limited = validate_config(dict(data, pairing=dict(data["pairing"], limit=3)))
    assert [s.key for s in build_plan(limited)] == [s.key for s in plan[:3]]
