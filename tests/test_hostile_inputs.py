"""Hostile and broken inputs without Ray: images, tars, prompts, config, operator faults, security
(docs/architecture.md §7).

Each broken input must become a `failed` row whose reason names the problem, each awkward one must load and
convert correctly, and nothing may raise out of a stage.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, validate_config
from pipeline.generate.stages import Stylizer, decode_batch, prompt_meta, to_table
from pipeline.io.captions import clean_prompt
from pipeline.io.images import DecodeError, decode_image, encode_transport, open_rgb, output_problem
from pipeline.io.sources import SourceError, check_output, read_content, read_images, read_prompts
from pipeline.plan.keys import build_plan
from tests.hostile_corpus import (
    BOMB_SIDE,
    HOSTILE_PROMPTS,
    LONG_PROMPT,
    hostile_content,
    hostile_tar,
    image_corpus,
    prompt_only_manifest,
    textured,
)

REPO = Path(__file__).resolve().parents[1]
BIG = 64_000_000


def close(pixel, expected, tol=40) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected, strict=True))


# ---- images ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    dest = tmp_path_factory.mktemp("corpus")
    return dest, image_corpus(dest)


def test_every_corpus_image_is_refused_with_its_reason_or_converted_exactly(corpus):
    dest, expect = corpus
    for name, exp in expect.items():
        data = (dest / name).read_bytes()
        if exp.status == "failed":
            with pytest.raises(DecodeError) as info:
                decode_image(data, max_pixels=BIG, max_side=64, max_aspect=20)
            assert exp.reason in str(info.value), (name, str(info.value))
            continue
        im = decode_image(data, max_pixels=BIG, max_side=64, max_aspect=20)
        assert (im.mode, im.size) == ("RGB", exp.size), name
        for xy, color in exp.pixels:
            assert close(im.getpixel(xy), color), (name, xy, im.getpixel(xy), color)


def test_max_aspect_is_the_documented_limit():
    wide = Image.new("RGB", (400, 20), (1, 2, 3))  # 20:1 exactly
    data = encode_transport(wide)
    assert decode_image(data, max_pixels=BIG, max_side=64, max_aspect=20).size == (64, 3)
    with pytest.raises(DecodeError, match=r"aspect ratio 20:1 \(400x20\) exceeds max_aspect=10"):
        decode_image(data, max_pixels=BIG, max_aspect=10)
    tall = encode_transport(Image.new("RGB", (2, 4000)))
    with pytest.raises(DecodeError, match="aspect ratio 2000:1"):
        decode_image(tall, max_pixels=BIG, max_aspect=20)
    assert decode_image(tall, max_pixels=BIG).size == (2, 4000)  # no limit given: nothing refused


def test_decoding_a_bomb_never_allocates_its_pixels(corpus):
    """30000x30000 is 2.7 GB as RGB; decoding it in a fresh process must stay near the interpreter's own size."""
    dest, _ = corpus
    code = (
        "import resource, sys\n"
        "from pipeline.io.images import decode_image, DecodeError\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "gif = open(sys.argv[2], 'rb').read()\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for name in ('png', 'gif'):\n"
        "    try:\n"
        "        decode_image(data if name == 'png' else gif, max_pixels=64_000_000, max_side=512)\n"
        "        print('decoded')\n"
        "    except DecodeError as exc:\n"
        "        print('refused', exc)\n"
        "print('grew_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    # a GIF whose logical screen claims 30000x30000 (header only: the image data is one pixel)
    gif = bytearray(encode_gif_1px())
    gif[6:10] = BOMB_SIDE.to_bytes(2, "little") * 2
    (dest / "bomb.gif").write_bytes(bytes(gif))
    proc = subprocess.run([sys.executable, "-c", code, str(dest / "bomb.png"), str(dest / "bomb.gif")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"refused image too large: {BOMB_SIDE}x{BOMB_SIDE}"), lines
    assert lines[1].startswith(f"refused image too large: {BOMB_SIDE}x{BOMB_SIDE}"), lines
    grew_mb = int(lines[-1].split()[1]) / 1024
    assert grew_mb < 50, f"decoding a bomb grew the process by {grew_mb:.0f} MB"


def encode_gif_1px() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("P", (1, 1)).save(buf, format="GIF")
    return buf.getvalue()


def test_unexpected_decoder_exceptions_become_decode_errors(monkeypatch):
    import pipeline.io.images as images

    def explode(im):
        raise KeyError("corrupt EXIF")

    monkeypatch.setattr(images.ImageOps, "exif_transpose", explode)
    with pytest.raises(DecodeError, match="cannot decode image: KeyError"):
        decode_image(encode_transport(Image.new("RGB", (4, 4))), max_pixels=BIG)


# ---- tars and manifests -----------------------------------------------------------------------------------


def test_hostile_tar_members_become_explained_errors(tmp_path, caplog):
    expect = hostile_tar(tmp_path / "hostile.tar", tmp_path / "escape")
    with caplog.at_level("WARNING", logger="pipeline"):
        items = {i.id: i for i in read_images(str(tmp_path / "hostile.tar"), "content.images")}
    assert set(items) == set(expect)
    for sid, exp in expect.items():
        if exp.status == "failed":
            assert items[sid].image is None and exp.reason in items[sid].error, (sid, items[sid])
        else:
            assert items[sid].error is None and items[sid].image.size > 0, sid
    assert items["hostile.tar/good0"].prompt == "a good sample with a NUL"
    assert items["hostile.tar/good1"].prompt == "caption from json"
    assert items["hostile.tar/badjson"].prompt is None
    assert "hostile.tar is truncated or corrupt" in caplog.text
    assert "badjson.json" in caplog.text
    assert not (tmp_path / "escape").exists()


def test_tar_cut_between_members_is_reported(tmp_path, caplog):
    import io
    import tarfile

    path = tmp_path / "cut.tar"
    png = encode_transport(textured((16, 16)))
    with tarfile.open(path, "w") as tar:
        for key in ("a", "b"):
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(png)
            tar.addfile(info, io.BytesIO(png))
    with tarfile.open(path) as tar:
        second = tar.getmember("b.png")
    path.write_bytes(path.read_bytes()[: second.offset])  # exactly at a header: tarfile itself says nothing
    with caplog.at_level("WARNING", logger="pipeline"):
        items = read_images(str(path), "style.images")
    assert [i.id for i in items] == ["cut.tar/a"] and items[0].error is None
    assert "cut.tar is truncated or corrupt after 1 samples (no end-of-archive marker)" in caplog.text


def test_hostile_prompts_in_a_manifest(tmp_path):
    manifest, expect, prompts = hostile_content(tmp_path)
    items = {i.id: i for i in read_images(str(manifest), "content.images")}
    assert set(items) == set(expect)
    for pid in HOSTILE_PROMPTS:
        item = items[f"prompt-{pid}"]
        exp = expect[f"prompt-{pid}"]
        if exp.status == "failed":
            assert exp.reason in item.error, (pid, item)
        else:
            assert item.error is None and item.prompt == prompts[f"prompt-{pid}"], (pid, item.prompt)


def test_prompt_cleaning_rules():
    assert clean_prompt("  a\x00b\x1b[0m\x7f\x80\x9f c\td\ne  ") == "ab[0m c\td\ne"
    assert clean_prompt("\x00\x01 \x02") == ""
    assert clean_prompt("狐 🦊‍ x") == "狐 🦊‍ x"  # zero-width joiner is a format character, not control


def test_prompt_only_sources_fail_empty_prompts_and_keep_the_rest(tmp_path):
    path, expect = prompt_only_manifest(tmp_path)
    items = {i.id: i for i in read_prompts(str(path))}
    assert set(items) == set(expect)
    for pid, exp in expect.items():
        if "empty prompt" in exp.reason:
            assert items[pid].error == "empty prompt" and items[pid].prompt is None
        else:
            assert items[pid].error is None and items[pid].prompt
    (tmp_path / "p.txt").write_text("first\n\x00\x07\n \nsecond\x1b\r\nthird\x85 part\n")
    assert [i.prompt for i in read_prompts(str(tmp_path / "p.txt"))] == ["first", "second", "third part"]


def test_image_manifest_rows_without_an_image_are_not_lost(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text('{"image": "a.png"}\n{"prompt": "no image here"}\n{"id": "x"}\n')
    items = read_images(str(tmp_path / "m.jsonl"), "content.images")
    assert [(i.id, i.error) for i in items] == [
        ("a.png", None), ("m.jsonl:2", "manifest row has no image"), ("x", "row has no prompt and no image")]


# ---- a Ray-less pass through the stages: decode and a real operator --------------------------------------


def _stage_config(tmp_path, content: dict, **sections):
    style = tmp_path / "style"
    style.mkdir(exist_ok=True)
    textured((32, 32), seed=1).save(style / "s.png")
    data = {"output": {"path": str(tmp_path / "out")}, "content": content, "style": {"images": str(style)},
            "decode": {"max_side": 64}, "operator": {"name": "color-transfer"}}
    data.update(sections)
    return validate_config(data)


def _through_stages(cfg) -> dict[str, dict]:
    table = to_table([s.to_row() for s in build_plan(cfg)])
    table = decode_batch(table, cfg.decode.model_dump())
    stylizer = Stylizer(cfg.operator.model_dump(), cfg.output.model_dump())
    return {r["content_id"]: r for r in stylizer(table).to_pylist()}


def test_prompt_only_content_with_a_real_operator_fails_per_sample(tmp_path):
    path, expect = prompt_only_manifest(tmp_path)
    rows = _through_stages(_stage_config(tmp_path, {"prompts": str(path)}))
    assert set(rows) == set(expect)
    for cid, exp in expect.items():
        assert rows[cid]["status"] == "failed" and rows[cid]["reason"] == exp.reason, rows[cid]["reason"]


def test_awkward_and_broken_images_through_decode_and_stylize(tmp_path):
    manifest, expect, prompts = hostile_content(tmp_path / "content")
    rows = _through_stages(_stage_config(tmp_path, {"images": str(manifest)}))
    assert set(rows) == set(expect)
    for cid, exp in expect.items():
        row = rows[cid]
        if exp.status == "failed":
            assert row["status"] == "failed" and exp.reason in row["reason"], (cid, row["reason"])
            continue
        assert not row["status"] and row["image"], (cid, row["reason"])
        assert row["prompt"] == prompts[cid], cid
        meta = json.loads(row["meta"])
        if prompts[cid] is None:
            assert "prompt_truncated" not in meta
        else:
            assert meta["prompt_truncated"] is (cid == "prompt-long"), (cid, meta)
            assert meta["prompt_chars"] == len(prompts[cid])
        assert open_rgb(row["image"]).size == (exp.size or (48, 48)), cid


class FakeOp:
    """Returns per key what ``outputs`` says: an exception to raise, a result dict, or an image."""

    name = "fake"

    def __init__(self, outputs: dict):
        self.outputs = outputs
        self.calls: list[list[str]] = []

    def __call__(self, items):
        self.calls.append([i["key"] for i in items])
        results = []
        for item in items:
            out = self.outputs[item["key"]]
            if isinstance(out, Exception):
                raise out
            results.append(out if isinstance(out, dict) else {"key": item["key"], "image": out, "meta": {}})
        return results


def _rows(keys: list[str], prompt: str | None = "a fox") -> list[dict]:
    png = encode_transport(textured((16, 16)))
    return [{"key": k, "status": None, "prompt": prompt, "content_id": k, "style_id": "s", "seed": 0,
             "style_bytes": png, "content_bytes": png} for k in keys]


def _stylize(tmp_path, outputs: dict, prompt: str | None = "a fox") -> tuple[dict[str, dict], FakeOp]:
    stylizer = Stylizer({"name": "color-transfer"}, {"path": str(tmp_path)})
    stylizer.op = FakeOp(outputs)
    table = stylizer(to_table(_rows(list(outputs), prompt)))
    return {r["key"]: r for r in table.to_pylist()}, stylizer.op


def test_operator_faults_fail_only_their_sample(tmp_path):
    good = textured((16, 16))
    nan = Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32), "F")
    rows, op = _stylize(tmp_path, {
        "good": good,
        "boom": RuntimeError("shape mismatch in the style encoder"),
        "black": Image.new("RGB", (16, 16)),
        "nan": nan,
        "text": "not an image",
        "none": {"key": "none"},
        "empty": Image.new("RGB", (0, 0)),
        "flat": Image.new("RGB", (16, 16), (90, 90, 90)),
        "refused": {"key": "refused", "error": "prompt too long for this model"},
    })
    assert len(op.calls[0]) == 9 and len(op.calls) == 10  # the batch, then one call per sample
    assert rows["good"]["status"] is None and rows["good"]["image"]
    assert rows["flat"]["status"] is None  # a flat input can give a flat output: kept
    expected = {
        "boom": "operator error: RuntimeError: shape mismatch in the style encoder",
        "black": "operator produced an all-black image",
        "nan": "operator produced NaN or infinite pixels",
        "text": "operator returned str, not a PIL image",
        "none": "operator returned NoneType, not a PIL image",
        "empty": "operator produced an empty image (0x0)",
        "refused": "operator: prompt too long for this model",
    }
    for key, reason in expected.items():
        assert (rows[key]["status"], rows[key]["reason"], rows[key]["image"]) == ("failed", reason, None), key


def test_operator_returning_the_wrong_number_of_results_fails_per_sample(tmp_path):
    class Short(FakeOp):
        def __call__(self, items):
            self.calls.append([i["key"] for i in items])
            return []

    stylizer = Stylizer({"name": "color-transfer"}, {"path": str(tmp_path)})
    stylizer.op = Short({})
    rows = stylizer(to_table(_rows(["a", "b"]))).to_pylist()
    assert [r["reason"] for r in rows] == ["operator error: ValueError: operator returned 0 results for 1 items"] * 2


def test_output_problem_accepts_real_outputs():
    assert output_problem(Image.new("RGB", (1, 1), (0, 0, 1))) is None
    assert output_problem(Image.new("L", (4, 4), 0)) == "produced an all-black image"


def test_prompt_meta_records_clip_truncation():
    assert prompt_meta(None) == {}
    short = prompt_meta("a red fox")
    assert short["prompt_truncated"] is False and short["prompt_clip_tokens"] == 3
    long = prompt_meta(LONG_PROMPT)
    assert long["prompt_truncated"] is True and long["prompt_chars"] == 3000 and long["prompt_clip_tokens"] > 75


# ---- config and environment --------------------------------------------------------------------------------

BASE = {"output": {"path": "out/x"}, "content": {"prompts": "p.txt"}, "style": {"images": "s/"}}


@pytest.mark.parametrize(
    "section, values, needles",
    [
        ("decode", {"max_aspect": 0.5}, ["decode.max_aspect"]),
        ("decode", {"max_aspect": "wide"}, ["decode.max_aspect"]),
        ("decode", {"max_pixels": -1}, ["decode.max_pixels"]),
        ("decode", {"max_side": 10**9}, ["decode.max_side"]),
        ("decode", {"maxside": 64}, ["decode.maxside", "unknown key"]),
        ("pairing", {"limit": -3}, ["pairing.limit"]),
        ("pairing", {"seeds_per_pair": 1e12}, ["pairing.seeds_per_pair"]),
        ("operator", {"model": "tiny:nope"}, ["operator.model", "tiny:nope"]),
        ("operator", {"name": "sissi", "model": "tiny:sd15"}, ["operator.model", "tiny:flux-fill"]),
        ("operator", {"name": "ad-t2i", "model": "/no/such/model/dir"}, ["operator.model", "/no/such/model/dir"]),
        ("operator", {"name": "ad-t2i", "model": "tiny:sd15@x"}, ["operator.model", "whole number"]),
        ("operator", {"name": "ad-t2i", "model": "not a repo id!"}, ["operator.model", "not a repo id!"]),
        ("operator", {"name": "nope"}, ["operator.name", "nope"]),
        ("scoring", {"clip_model": "tiny:sd15"}, ["scoring.clip_model", "tiny:clip"]),
        ("scoring", {"clip_model": "./no/clip/dir"}, ["scoring.clip_model", "./no/clip/dir"]),
        ("scoring", {"clip_pretrained": "/no/weights.safetensors"}, ["scoring.clip_pretrained", "/no/weights"]),
    ],
)
def test_bad_config_values_name_the_key(section, values, needles):
    data = {k: dict(v) for k, v in BASE.items()}
    data[section] = values
    with pytest.raises(ConfigError) as info:
        validate_config(data, "run.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("run.yaml: ") and "Value error" not in message
    for needle in needles:
        assert needle in message, message


def test_good_model_specs_still_validate():
    for section, values in [("operator", {"name": "sissi", "model": "tiny:flux-fill"}),
                            ("operator", {"name": "ad-t2i", "model": "tiny:sdxl@3"}),
                            ("operator", {"name": "ad-t2i", "model": "stable-diffusion-v1-5/stable-diffusion-v1-5"}),
                            ("scoring", {"clip_model": "ViT-L-14", "clip_pretrained": "openai"}),
                            ("scoring", {"clip_model": "no-such-clip-model"})]:  # checked where it loads
        data = {k: dict(v) for k, v in BASE.items()}
        data[section] = values
        validate_config(data)


def test_max_aspect_does_not_change_sample_keys():
    a = validate_config({**BASE, "decode": {"max_aspect": 20}})
    b = validate_config({**BASE, "decode": {"max_aspect": 3}})
    assert a.operator_hash() == b.operator_hash()


def test_unwritable_output_is_a_source_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SourceError, match=r"output.path: cannot write to .*file/out \(NotADirectoryError: .*is a file"):
        check_output(str(tmp_path / "file" / "out"))
    with pytest.raises(SourceError, match="output.path: cannot write"):
        check_output(str(tmp_path / "file"))
    check_output(str(tmp_path / "fine" / "out"))
    assert not (tmp_path / "fine").exists()  # checking creates nothing


@pytest.mark.s3
def test_missing_bucket_and_unreachable_endpoint(s3_env, monkeypatch, tmp_path):
    with pytest.raises(SourceError, match="style.images: not found: s3://no-such-bucket-6/style/"):
        read_images("s3://no-such-bucket-6/style/", "style.images")
    with pytest.raises(SourceError, match="output.path: cannot write to s3://no-such-bucket-6/out"):
        check_output("s3://no-such-bucket-6/out")
    with pytest.raises(SourceError, match="content.prompts: "):
        read_content("s3://no-such-bucket-6/p.txt", None)
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(SourceError, match=r"style.images: cannot reach s3://\S+ \(EndpointConnectionError"):
        read_images(f"s3://{s3_env['bucket']}/style/", "style.images")
    s3fs.S3FileSystem.clear_instance_cache()


# ---- security -------------------------------------------------------------------------------------------------


def _calls(text: str, name: str) -> list[str]:
    """The argument text of every ``name(...)`` call (balanced parentheses)."""
    out = []
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, match.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[match.end(): i - 1])
    return out


def test_weights_load_only_through_safetensors_and_never_run_remote_code():
    sources = {p: p.read_text() for p in sorted((REPO / "operators").rglob("*.py"))}
    assert REPO / "operators" / "ad" / "model.py" in sources  # subpackages are scanned too
    n_calls = n_torch_loads = 0
    for path, text in sources.items():
        assert "trust_remote_code" not in text, path
        assert not re.search(r"\bimport pickle\b|\bpickle\.load", text), path
        for args in _calls(text, "torch.load"):  # only the head converter, and tensors only: never code
            n_torch_loads += 1
            assert "weights_only=True" in args, (path, args)
        for args in _calls(text, ".from_pretrained"):
            n_calls += 1
            ok = "use_safetensors=True" in args or ("**kwargs" in args and '"use_safetensors": True' in text)
            assert ok, (path, args)
        for args in _calls(text, "create_model_and_transforms"):
            assert "weights_only=True" in args, (path, args)
    assert n_calls >= 3 and n_torch_loads == 1
