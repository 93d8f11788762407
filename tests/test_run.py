"""End-to-end runs on an embedded Ray with the real sample images: sources -> shards + index."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from pipeline.config import validate_config
from pipeline.generate.run import cpu_threads_warning, feeding_args, run
from pipeline.generate.stages import Stylizer, clip_tokenizer, to_table
from pipeline.io.images import encode_transport
from pipeline.plan.keys import build_plan
from tests.invariants import check_invariants, read_index

pytestmark = pytest.mark.slow


def make_config(out, content: dict, style: str, **sections) -> object:
    data = {
        "output": {"path": str(out), "samples_per_shard": 4},
        "content": content,
        "style": {"images": style},
        "pairing": {"styles_per_content": 1, "seed": 7},
        "decode": {"max_side": 64},
        "operator": {"name": "color-transfer", "batch_size": 2},
        "scoring": {"clip_model": "tiny:clip", "batch_size": 4},
    }
    for name, value in sections.items():
        data.setdefault(name, {}).update(value)
    return validate_config(data)


def test_folder_sources_run_resume_and_read_back(ray_local, samples, tmp_path):
    out = tmp_path / "out"
    cfg = make_config(out, {"images": str(samples / "content"), "prompts": str(samples / "prompts.txt")},
                      str(samples / "style"), pairing={"limit": 7})
    planned = {s.key for s in build_plan(cfg)}
    assert len(planned) == 7

    summary = run(cfg, quiet=True)
    assert (summary.planned, summary.skipped) == (7, 0)
    assert summary.kept + summary.rejected + summary.failed == 7
    assert summary.kept == 7  # no thresholds, valid images
    rows = check_invariants(str(out), planned)

    # Prompts come from the prompt file (cyclic over the content images).
    prompts = [p.strip() for p in (samples / "prompts.txt").read_text().splitlines() if p.strip()]
    assert {r["prompt"] for r in rows} <= set(prompts)

    # Read back with webdataset and with Ray Data: the same number of samples as kept rows.
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    wds_samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert sorted(s["__key__"] for s in wds_samples) == sorted(r["key"] for r in rows if r["status"] == "kept")
    for s in wds_samples:
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"] and meta["operator"]["operator"] == "color-transfer"
        assert s["png"][:8] == b"\x89PNG\r\n\x1a\n"
        assert s["txt"].decode() == meta["prompt"]
    ray_rows = ray_local.data.read_webdataset(tars, decoder=None).take_all()
    assert len(ray_rows) == summary.kept

    run_json = json.loads((out / "run.json").read_text())
    assert run_json["dataset"] == {"planned": 7, "kept": 7, "rejected": 0, "failed": 0, "complete": True}
    assert run_json["scores_meaningful"] is False and "meaningless" in run_json["scores_note"]
    assert run_json["config"]["operator"]["name"] == "color-transfer"
    assert run_json["versions"]["ray"] == "2.60.0"

    # Rerun: nothing to do, nothing rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    again = run(cfg, quiet=True)
    assert again.line() == "planned=7 kept=0 rejected=0 failed=0 skipped=7"
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == before

    # Growing the plan only does the new samples.
    bigger = make_config(out, {"images": str(samples / "content"), "prompts": str(samples / "prompts.txt")},
                         str(samples / "style"), pairing={"limit": 9})
    grown = run(bigger, quiet=True)
    assert (grown.planned, grown.skipped, grown.kept) == (9, 7, 2)
    check_invariants(str(out), {s.key for s in build_plan(bigger)})


def tar_images(out) -> dict[str, bytes]:
    """Key -> output image bytes of every sample in the shards of ``out``."""
    images = {}
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if ext in ("png", "jpg", "webp"):
                    images[key] = tar.extractfile(member).read()
    return images


def _tar_of(paths, dest, caption=None):
    with tarfile.open(dest, "w") as tar:
        for i, path in enumerate(paths):
            key = f"sample{i:04d}"
            tar.add(path, arcname=f"{key}{path.suffix.lower()}")
            if caption:
                data = caption(path).encode()
                info = tarfile.TarInfo(f"{key}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_tar_sources_with_brace_pattern(ray_local, samples, tmp_path):
    styles = sorted((samples / "style").iterdir())
    contents = sorted((samples / "content").iterdir())[:4]
    _tar_of(styles[:7], tmp_path / "style-0.tar")
    _tar_of(styles[7:], tmp_path / "style-1.tar")
    _tar_of(contents, tmp_path / "content.tar", caption=lambda p: f"a picture called {p.stem}")
    out = tmp_path / "out"
    cfg = make_config(out, {"images": str(tmp_path / "content.tar")}, str(tmp_path / "style-{0..1}.tar"),
                      pairing={"styles_per_content": 2})
    plan = build_plan(cfg)
    assert len(plan) == 8
    assert {p.style_id.split("/")[0] for p in plan} <= {"style-0.tar", "style-1.tar"}
    summary = run(cfg, quiet=True)
    assert summary.kept == 8
    rows = check_invariants(str(out), {p.key for p in plan})
    assert {r["prompt"] for r in rows} == {f"a picture called {p.stem}" for p in contents}


def test_bad_inputs_fail_alone_and_filters_reject(ray_local, samples, tmp_path):
    content = tmp_path / "content"
    content.mkdir()
    for p in sorted((samples / "content").iterdir())[:3]:
        shutil.copy(p, content / p.name)
    (content / "broken.jpg").write_bytes(os.urandom(2048))
    (content / "page.png").write_text("<!DOCTYPE html><html><body>not found</body></html>")
    out = tmp_path / "out"
    cfg = make_config(out, {"images": str(content), "prompts": str(samples / "prompts.txt")},
                      str(samples / "style"), filter={"min_style": 0.999999})
    plan = build_plan(cfg)
    summary = run(cfg, quiet=True)
    assert (summary.failed, summary.kept + summary.rejected) == (2, 3)
    rows = {r["content_id"]: r for r in check_invariants(str(out), {p.key for p in plan})}
    assert rows["broken.jpg"]["status"] == "failed"
    assert rows["broken.jpg"]["reason"].startswith("content: not an image")
    assert "HTML" in rows["page.png"]["reason"]
    good = [r for cid, r in rows.items() if cid not in ("broken.jpg", "page.png")]
    for r in good:
        assert r["clip_style"] is not None and -1.0 <= r["clip_style"] <= 1.0
        if r["status"] == "rejected":
            assert "min_style" in r["reason"] and r["clip_style"] < 0.999999
    # Thresholds can only reject; a failed run of the same config resumes to the same index.
    assert len(read_index(str(out))) == 5


def test_quality_heads_score_every_row_and_min_scores_at_the_median_keeps_half(ray_local, samples, tmp_path):
    import numpy as np

    from pipeline.output.store import OutputStore

    heads = {"heads": {"aesthetic": {"weights": "tiny"}, "nsfw": {"weights": "tiny"}}}
    content = {"images": str(samples / "content"), "prompts": str(samples / "prompts.txt")}
    cfg = make_config(tmp_path / "all", content, str(samples / "style"), pairing={"limit": 8}, scoring=heads)
    planned = {s.key for s in build_plan(cfg)}
    assert run(cfg, quiet=True).kept == 8
    rows = check_invariants(str(tmp_path / "all"), planned)
    assert all(np.isfinite(r["score_aesthetic"]) and 0 <= r["score_nsfw"] <= 1 for r in rows)
    for tar in (tmp_path / "all" / "shards").glob("*.tar"):  # the sample's json carries the scores too
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            meta = json.loads(s["json"])
            row = next(r for r in rows if r["key"] == s["__key__"])
            assert meta["score_aesthetic"] == row["score_aesthetic"] and meta["score_nsfw"] == row["score_nsfw"]
    full = OutputStore(str(tmp_path / "all")).read_index()  # the store's reader keeps the head columns
    assert {"score_aesthetic", "score_nsfw"} <= set(full.column_names) and full.num_rows == 8

    median = float(np.median([r["score_aesthetic"] for r in rows]))
    half = make_config(tmp_path / "half", content, str(samples / "style"), pairing={"limit": 8}, scoring=heads,
                       filter={"min_scores": {"aesthetic": median}})
    assert run(half, quiet=True).kept == 4
    for r in check_invariants(str(tmp_path / "half"), planned):
        assert (r["status"] == "kept") == (r["score_aesthetic"] >= median), r
        if r["status"] == "rejected":
            assert f"< min_scores.aesthetic {median}" in r["reason"]


def test_cpu_pools_asking_for_more_threads_than_cores_are_warned_about(tmp_path):
    """Two torch pools at num_cpus 2 on 2 cores oversubscribe them (the bench's sissi row: 0.63 of a bare loop,
    1.12 with the default one core each); GPU pools hold no CPU threads of their own."""
    def cfg(op_cpus, sc_cpus, op_gpus=0.0):
        return validate_config({"output": {"path": str(tmp_path)}, "content": {"prompts": str(tmp_path / "p.txt")},
                                "style": {"images": str(tmp_path)},
                                "operator": {"name": "color-transfer", "num_cpus": op_cpus, "num_gpus": op_gpus},
                                "scoring": {"clip_model": "tiny:clip", "num_cpus": sc_cpus}})

    assert cpu_threads_warning(cfg(1, 1), cores=2) is None
    warning = cpu_threads_warning(cfg(2, 2), cores=2)
    assert warning.startswith("the CPU actor pools ask for 4 threads on 2 cores")
    assert "operator: 1 x num_cpus 2" in warning and "scoring: 1 x num_cpus 2" in warning
    assert cpu_threads_warning(cfg(2, 2), cores=4) is None
    assert cpu_threads_warning(cfg(2, 2, op_gpus=1), cores=2) is None  # the operator is on a GPU


def _stylizer_rows(keys: list[str]) -> list[dict]:
    png = encode_transport(Image.new("RGB", (16, 16), (200, 40, 40)))
    return [{"key": k, "status": None, "prompt": "a fox", "content_id": k, "style_id": "s", "seed": 0,
             "style_bytes": png, "content_bytes": png} for k in keys]


def test_a_stylize_actor_loads_the_prompt_tokenizer_before_its_first_batch(tmp_path):
    """Importing open_clip for the prompt tokens took 16-24 s of the first batch on a busy machine, with every GPU
    waiting (benchmarks/bench_gpu_feeding.py); the actor loads it with the model instead."""
    clip_tokenizer.cache_clear()
    Stylizer({"name": "color-transfer"}, {"path": str(tmp_path)})
    assert clip_tokenizer.cache_info().currsize == 1


def test_a_gpu_stylizer_overlaps_batches_but_calls_its_operator_one_at_a_time(tmp_path):
    """A GPU pool runs two calls per actor, so one batch's CPU work overlaps the other's device call; the operator
    (one model on one device) is never entered twice at once. A CPU pool stays one call per actor."""
    import threading
    import time

    assert feeding_args(1) == {"max_concurrent_calls_per_actor": 2, "enable_true_multi_threading": True}
    assert feeding_args(0.5)["max_concurrent_calls_per_actor"] == 2 and feeding_args(0) == {}

    class Probe:
        def __init__(self):
            self.active = self.most = self.calls = 0

        def __call__(self, items):
            self.active += 1
            self.most, self.calls = max(self.most, self.active), self.calls + 1
            time.sleep(0.05)  # hold the "device" long enough for the other thread to arrive
            self.active -= 1
            return [{"key": i["key"], "image": i["style"], "meta": {}} for i in items]

    stylizer = Stylizer({"name": "color-transfer"}, {"path": str(tmp_path)})
    stylizer.op = probe = Probe()
    out = []
    threads = [threading.Thread(target=lambda k=k: out.append(stylizer(to_table(_stylizer_rows([k, k + "2"])))))
               for k in ("a", "b", "c", "d")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert probe.calls == 4 and probe.most == 1
    rows = [r for table in out for r in table.to_pylist()]
    assert len(rows) == 8 and all(r["status"] is None and r["image"] for r in rows)  # stylized, none failed
