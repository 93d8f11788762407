"""Each diffusion operator through the whole pipeline (embedded Ray, tiny offline models, shared samples):
the output invariants of docs/architecture.md §5 hold and the images have the operator's output size."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from pipeline.config import validate_config
from pipeline.generate.run import run
from pipeline.plan.keys import build_plan
from tests.invariants import check_invariants
from tests.test_run import tar_images

pytestmark = pytest.mark.slow

CASES = {
    "sissi": ("tiny:flux-fill", {"panel_size": 64, "steps": 2, "dssi": {"mode": "dynamic"}}, (64, 64), False),
    "ad-t2i": ("tiny:sd15", {"steps": 2, "iters": 1, "size": 64}, (64, 64), False),
    # FLUX through the same operator; 32 px = 2x2 packed tokens, a short T5 sequence keeps it fast on CPU
    "ad-t2i/flux": ("tiny:flux", {"steps": 2, "iters": 1, "size": 32, "max_sequence_length": 32}, (32, 32), False),
    "ad-transfer": ("tiny:sd15", {"steps": 2, "iters": 1, "size": 64}, (64, 64), True),
    "ad-texture": ("tiny:sd15", {"steps": 2, "iters": 1, "size": 64}, (64, 64), False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_operator_run_passes_invariants(ray_local, samples, tmp_path, name):
    model, params, size, needs_content = CASES[name]
    name = name.split("/")[0]
    content = {"prompts": str(samples / "prompts.txt")}
    if needs_content:
        content["images"] = str(samples / "content")
    cfg = validate_config({
        "output": {"path": str(tmp_path / "out"), "samples_per_shard": 2},
        "content": content,
        "style": {"images": str(samples / "style")},
        "pairing": {"limit": 3, "seed": 1},
        "decode": {"max_side": 96},
        "operator": {"name": name, "model": model, "params": params, "batch_size": 2},
        "scoring": {"clip_model": "tiny:clip"},
    })
    plan = build_plan(cfg)
    summary = run(cfg, quiet=True)
    assert summary.kept == 3, summary
    rows = check_invariants(str(tmp_path / "out"), {p.key for p in plan})
    images = tar_images(tmp_path / "out")
    assert len(images) == 3
    for key, data in images.items():
        assert Image.open(io.BytesIO(data)).size == size, key
    for r in rows:
        meta = json.loads(r["meta"])
        assert meta["worker"]["pid"] > 0
        assert r["clip_style"] is not None
