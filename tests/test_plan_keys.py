"""Plans never move: the keys, pairings, seeds and prompts the current code makes for every source kind equal those
recorded in tests/data/plan_keys.json (an upgrade that moved one would redo finished outputs), both in the driver
(``build_plan``) and on Ray (``plan_dataset``)."""

from __future__ import annotations

import json

import pytest

from pipeline.config import validate_config
from pipeline.plan.keys import build_plan
from tests.plan_cases import RECORDED, build_corpus, cases


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("plan-corpus"))


RECORDED_PLANS = json.loads(RECORDED.read_text())


def test_every_case_is_recorded(corpus):
    assert set(cases(corpus)) == set(RECORDED_PLANS)


@pytest.mark.parametrize("name", sorted(RECORDED_PLANS))
def test_driver_plan_equals_the_recorded_plan(corpus, name):
    plan = build_plan(validate_config(cases(corpus)[name]))
    assert [[s.key, s.content_id, s.style_id, s.seed, s.prompt] for s in plan] == RECORDED_PLANS[name]


@pytest.mark.parametrize("name", sorted(RECORDED_PLANS))
def test_cluster_plan_equals_the_recorded_plan(ray_local, corpus, name):
    from pipeline.plan.dataset import collect, plan_dataset

    plan = collect(plan_dataset(validate_config(cases(corpus)[name])))
    assert [[s.key, s.content_id, s.style_id, s.seed, s.prompt] for s in plan] == RECORDED_PLANS[name]


def test_cluster_plan_carries_the_same_input_locations(ray_local, corpus):
    from pipeline.plan.dataset import collect, plan_dataset

    for name in ("tar_glob_prompts", "manifests_glob_dup_ids"):
        cfg = validate_config(cases(corpus)[name])
        assert collect(plan_dataset(cfg)) == build_plan(cfg)


def test_a_source_error_on_a_worker_reaches_the_driver_as_one_line(ray_local, corpus, tmp_path):
    from pipeline.io.sources import SourceError
    from pipeline.plan.dataset import plan_dataset

    bad = tmp_path / "tars"
    bad.mkdir()
    (bad / "a.tar").write_bytes((corpus / "tars" / "shard-000.tar").read_bytes())
    (bad / "b.tar").write_bytes(b"this is not a tar archive at all" * 40)
    cfg = validate_config({**cases(corpus)["tar"], "content": {"images": str(bad / "*.tar")}})
    with pytest.raises(SourceError) as err:
        plan_dataset(cfg)
    assert type(err.value) is SourceError  # plain: the CLI prints it as one line and exits 2
    assert str(err.value).startswith(f"content.images: {bad / 'b.tar'} is not a readable tar")


def test_the_style_catalogue_is_bounded_with_a_clear_error(ray_local, corpus, monkeypatch):
    from pipeline.io.sources import SourceError
    from pipeline.plan import dataset as planner

    monkeypatch.setattr(planner, "MAX_STYLES", 5)
    with pytest.raises(SourceError, match=r"^style.images: .* has 7 styles, more than the 5 this version can "
                                          r"broadcast to every worker$"):
        planner.plan_dataset(validate_config(cases(corpus)["folder"]))
