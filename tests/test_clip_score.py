"""operators.clip_score with the offline tiny CLIP, and the filter that consumes the scores
(pipeline.generate.stages.apply_filter)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from operators.clip_score import ClipScorer, resolve_clip
from operators.models import resolve_model
from pipeline.config import ScoreThresholds
from pipeline.generate.stages import apply_filter
from tests.unit_helpers import SAMPLES


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Build tiny:clip once into a private cache (STYLEGEN_CACHE) for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STYLEGEN_CACHE", str(tmp_path_factory.mktemp("clip-cache")))
        path = resolve_model("tiny:clip")
        yield path


@pytest.fixture(scope="module")
def scorer(tiny_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STYLEGEN_CACHE", str(os.path.dirname(os.path.dirname(tiny_dir))))
        yield ClipScorer("tiny:clip", "none", device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """The same weights loaded straight through open_clip: the manual computation to compare with."""
    import open_clip

    name = f"local-dir:{tiny_dir}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device="cpu", weights_only=True)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


@pytest.fixture(scope="module")
def images():
    out = {}
    for rel in ("content/deer.jpg", "content/1.jpg", "style/1.png", "style/2.jpg", "style/3.jpg"):
        im = Image.open(SAMPLES / rel).convert("RGB")
        im.thumbnail((96, 96))
        out[rel] = im
    return out


def manual_cos_image_image(reference, a: Image.Image, b: Image.Image) -> float:
    model, preprocess, _ = reference
    with torch.no_grad():
        ea = model.encode_image(preprocess(a).unsqueeze(0))[0]
        eb = model.encode_image(preprocess(b).unsqueeze(0))[0]
    return float(torch.dot(ea, eb) / (ea.norm() * eb.norm()))


def manual_cos_text_image(reference, text: str, im: Image.Image) -> float:
    model, preprocess, tokenizer = reference
    with torch.no_grad():
        et = model.encode_text(tokenizer([text]))[0]
        ei = model.encode_image(preprocess(im).unsqueeze(0))[0]
    return float(torch.dot(et, ei) / (et.norm() * ei.norm()))


def test_tiny_clip_is_built_in_the_configured_cache(tiny_dir, tmp_path_factory):
    assert os.path.isdir(tiny_dir)
    assert os.path.isfile(os.path.join(tiny_dir, "open_clip_config.json"))
    assert any(name.endswith(".safetensors") for name in os.listdir(tiny_dir))
    assert str(tmp_path_factory.getbasetemp()) in tiny_dir


def test_scores_equal_manual_open_clip_cosines(scorer, reference, images):
    outputs = [images["content/deer.jpg"], images["content/1.jpg"]]
    prompts = ["a deer standing in a green field", "a painting of a city at night"]
    styles = [("unit/style-1", images["style/1.png"]), ("unit/style-2", images["style/2.jpg"])]
    content, style = scorer.score(outputs, prompts, styles)
    assert len(content) == len(style) == 2
    for i in range(2):
        assert content[i] == pytest.approx(manual_cos_text_image(reference, prompts[i], outputs[i]), abs=1e-5)
        assert style[i] == pytest.approx(manual_cos_image_image(reference, styles[i][1], outputs[i]), abs=1e-5)
        assert -1.0 - 1e-6 <= content[i] <= 1.0 + 1e-6 and -1.0 - 1e-6 <= style[i] <= 1.0 + 1e-6


def test_embeddings_are_l2_normalised(scorer, images):
    emb = scorer.embed_images([images["style/1.png"], images["style/3.jpg"]])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
    txt = scorer.embed_texts(["one", "a much longer prompt " * 50])  # 3,000-character prompts are normal
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)


def test_output_identical_to_style_scores_one(scorer, images):
    im = images["style/3.jpg"]
    _, style = scorer.score([im], [None], [("unit/self", im)])
    assert style[0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("prompt", [None, "", "   "])
def test_missing_prompt_gives_no_content_score(scorer, images, prompt):
    outputs = [images["content/deer.jpg"], images["content/1.jpg"]]
    content, style = scorer.score(outputs, [prompt, "a deer"], [("unit/a", images["style/1.png"])] * 2)
    assert content[0] is None
    assert isinstance(content[1], float) and math.isfinite(content[1])
    assert all(isinstance(s, float) and math.isfinite(s) for s in style)


def test_empty_batch(scorer):
    assert scorer.score([], [], []) == ([], [])


class CountingEmbed:
    def __init__(self, scorer):
        self.inner = scorer.embed_images
        self.calls: list[int] = []

    def __call__(self, ims):
        self.calls.append(len(ims))
        return self.inner(ims)


def test_style_embedding_is_cached_by_style_id(scorer, images, monkeypatch):
    counter = CountingEmbed(scorer)
    monkeypatch.setattr(scorer, "embed_images", counter)
    out = [images["content/deer.jpg"]]
    style = ("unit/cached-style", images["style/2.jpg"])

    _, first = scorer.score(out, [None], [style])
    assert counter.calls == [1, 1]  # the output, then the style
    _, second = scorer.score(out, [None], [style])
    assert counter.calls == [1, 1, 1]  # only the output: the style came from the cache
    assert second == pytest.approx(first, abs=1e-6)

    counter.calls.clear()
    repeated = ("unit/repeated-in-batch", images["style/3.jpg"])
    scorer.score([out[0]] * 3, [None] * 3, [repeated] * 3)
    assert counter.calls == [3, 1]  # three outputs, one embedding for the style used three times


def test_style_cache_eviction_never_loses_a_style_of_the_current_batch(tiny_dir, images):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STYLEGEN_CACHE", str(os.path.dirname(os.path.dirname(tiny_dir))))
        small = ClipScorer("tiny:clip", "none", device="cpu", style_cache_size=2)
    out = [images["content/deer.jpg"]]
    a, b, c = ("a", images["style/1.png"]), ("b", images["style/2.jpg"]), ("c", images["style/3.jpg"])
    small.score(out, [None], [a])
    small.score(out, [None], [b])  # cache full: a (oldest), b
    _, style = small.score(out * 2, [None, None], [a, c])  # a is cached, c is new and evicts the oldest
    expected = small.embed_images(out)[0] @ small.embed_images([a[1], c[1]]).T
    assert style == pytest.approx(expected.tolist(), abs=1e-5)


def test_resolve_clip_meaningfulness(tiny_dir, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STYLEGEN_CACHE", str(os.path.dirname(os.path.dirname(tiny_dir))))
        name, weights, meaningful = resolve_clip("tiny:clip", "openai")
    assert name == f"local-dir:{tiny_dir}" and weights is None and meaningful is False
    assert resolve_clip("ViT-B-32", "none") == ("ViT-B-32", None, False)
    assert resolve_clip("ViT-B-32", "") == ("ViT-B-32", None, False)
    assert resolve_clip("ViT-B-32", "laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k", True)
    weights_file = str(tmp_path / "weights.safetensors")
    assert resolve_clip("ViT-B-32", weights_file) == ("ViT-B-32", weights_file, True)
    local = tmp_path / "my-clip"
    local.mkdir()
    assert resolve_clip(str(local), "none") == (f"local-dir:{local}", None, True)


# ---- pipeline.generate.stages.apply_filter: the thresholds on these scores ------------------------------------------


def filtered(c, s, **thresholds) -> dict:
    row = {"clip_content": c, "clip_style": s, "status": None, "reason": None}
    apply_filter(row, ScoreThresholds(**thresholds))
    return row


def test_filter_keeps_rows_that_meet_both_thresholds():
    row = filtered(0.3, 0.4, min_content=0.2, min_style=0.3)
    assert row["status"] == "kept" and row["reason"] is None
    assert filtered(0.2, 0.3, min_content=0.2, min_style=0.3)["status"] == "kept"  # equal is not a miss


def test_filter_rejects_low_content_score_with_reason():
    row = filtered(0.1, 0.9, min_content=0.2, min_style=0.3)
    assert row["status"] == "rejected"
    assert "clip_content" in row["reason"] and "min_content" in row["reason"]
    assert "clip_style" not in row["reason"]


def test_filter_rejects_low_style_score_with_reason():
    row = filtered(0.9, 0.1, min_content=0.2, min_style=0.3)
    assert row["status"] == "rejected"
    assert "clip_style" in row["reason"] and "min_style" in row["reason"]
    assert "clip_content" not in row["reason"]


def test_filter_reports_both_misses():
    row = filtered(0.0, 0.0, min_content=0.2, min_style=0.3)
    assert row["status"] == "rejected"
    assert "min_content" in row["reason"] and "min_style" in row["reason"]


def test_no_thresholds_keep_everything_finite():
    assert filtered(-0.9, -0.9)["status"] == "kept"


@pytest.mark.parametrize(("c", "s"), [(None, None), (None, 0.5), (0.5, None)])
def test_none_scores_never_reject(c, s):
    assert filtered(c, s, min_content=0.2, min_style=0.3)["status"] == "kept"


def test_none_content_score_does_not_hide_a_style_miss():
    row = filtered(None, 0.1, min_content=0.2, min_style=0.3)
    assert row["status"] == "rejected" and "min_style" in row["reason"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", ["c", "s"])
def test_non_finite_scores_reject_even_without_thresholds(bad, which):
    c, s = (bad, 0.5) if which == "c" else (0.5, bad)
    for thresholds in ({}, {"min_content": 0.0, "min_style": 0.0}):
        row = filtered(c, s, **thresholds)
        assert row["status"] == "rejected", thresholds
        assert "finite" in row["reason"]


def test_the_prompt_tokenizer_is_open_clips_without_importing_the_package():
    """The stylize actor counts prompt tokens with open_clip's BPE; it must not pay for the open_clip package's
    import (torchvision models, torch._dynamo, transformers: seconds of every actor's start-up). In a new
    interpreter: the tokens equal open_clip's own, and the package was not imported to get them."""
    code = (
        "import sys, json\n"
        "from pipeline.generate.stages import clip_tokenizer, prompt_meta\n"
        "prompts = ['a fox', 'Ünïcödé &amp; <b>html</b>  spaces', 'word ' * 90]\n"
        "tokens = [clip_tokenizer().encode(p) for p in prompts]\n"
        "alone = 'open_clip' not in sys.modules and 'transformers' not in sys.modules\n"
        "meta = prompt_meta(prompts[2])\n"
        "from open_clip.tokenizer import SimpleTokenizer\n"
        "print(json.dumps([alone, tokens == [SimpleTokenizer().encode(p) for p in prompts], meta]))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    alone, same, meta = json.loads(done.stdout.strip().splitlines()[-1])
    assert alone and same, (alone, same)
    assert meta == {"prompt_chars": 450, "prompt_clip_tokens": 90, "prompt_truncated": True}, meta


def test_random_clip_weights_are_the_same_in_every_actor_and_leave_the_global_rng_alone():
    """The demo scores with a random ViT-B-32 (``clip_pretrained: none``): two scoring actors of one run, or two
    runs, must hold the same model (the same sample, the same score), and building it must not move the caller's
    random stream."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = ClipScorer("ViT-B-32", "none", device="cpu")
    assert torch.equal(torch.rand(3), expected)
    second = ClipScorer("ViT-B-32", "none", device="cpu")
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    image = Image.new("RGB", (40, 30), (90, 160, 30))
    assert torch.equal(first.embed_images([image]), second.embed_images([image]))
