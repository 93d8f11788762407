"""pipeline.io.sources: listing content and style items from folders, globs, tars and manifests."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.io.fs import read_range
from pipeline.io.sources import SourceError, read_content, read_images, read_prompts
from tests.unit_helpers import DEMO, SAMPLES

STYLE_FILES = sorted(p for p in (SAMPLES / "style").iterdir() if p.suffix in (".jpg", ".png"))


def item_bytes(item) -> bytes:
    return read_range(item.image.url, item.image.offset, item.image.size)


@pytest.fixture()
def nested_folder(tmp_path: Path) -> Path:
    root = tmp_path / "styles"
    (root / "sub" / "deeper").mkdir(parents=True)
    shutil.copy(STYLE_FILES[0], root / "a.jpg")
    shutil.copy(STYLE_FILES[1], root / "sub" / "b.png")
    shutil.copy(STYLE_FILES[2], root / "sub" / "deeper" / "c.jpg")
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "README").write_text("no extension")
    return root


def test_folder_is_recursive_with_ids_relative_to_folder(nested_folder):
    items = read_images(str(nested_folder), "style.images")
    assert sorted(i.id for i in items) == ["a.jpg", "sub/b.png", "sub/deeper/c.jpg"]
    for item in items:
        assert item.error is None and item.prompt is None
        assert item_bytes(item) == (nested_folder / item.id).read_bytes()


def test_folder_listing_is_deterministic(nested_folder):
    first = read_images(str(nested_folder), "style.images")
    second = read_images(str(nested_folder) + "/", "style.images")
    assert first == second


def test_glob_ids_are_relative_to_the_fixed_part(nested_folder):
    items = read_images(str(nested_folder / "sub" / "**" / "*.jpg"), "style.images")
    assert [i.id for i in items] == ["deeper/c.jpg"]
    items = read_images(str(nested_folder / "*" / "*.png"), "style.images")
    assert [i.id for i in items] == ["sub/b.png"]
    assert item_bytes(items[0]) == (nested_folder / "sub" / "b.png").read_bytes()


def test_single_image_file(nested_folder):
    items = read_images(str(nested_folder / "a.jpg"), "style.images")
    assert len(items) == 1
    assert item_bytes(items[0]) == (nested_folder / "a.jpg").read_bytes()


def _write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as tw:
        for sample in samples:
            tw.write(sample)


@pytest.fixture()
def shards(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    """Two WebDataset shards from the real style images: jpg+txt, png+json, and a sample without image."""
    expected: dict[str, dict] = {}
    for shard in (0, 1):
        samples = []
        for j, src in enumerate(STYLE_FILES[shard * 3: shard * 3 + 3]):
            key = f"s{shard}_{j:03d}"
            ext = src.suffix.lstrip(".")
            data = src.read_bytes()
            sample = {"__key__": key, ext: data}
            caption = f"caption {shard} {j} of {src.name}"
            if j % 2 == 0:
                sample["txt"] = caption.encode()
            else:
                sample["json"] = json.dumps({"caption": caption, "width": 1}).encode()
            samples.append(sample)
            expected[f"shard-{shard}.tar/{key}"] = {"bytes": data, "caption": caption}
        _write_shard(tmp_path / f"shard-{shard}.tar", samples)
    return tmp_path, expected


def test_webdataset_tar_offsets_and_captions(shards):
    root, expected = shards
    items = read_images(str(root / "shard-0.tar"), "style.images")
    want = {k: v for k, v in expected.items() if k.startswith("shard-0.tar/")}
    assert [i.id for i in items] == list(want)
    for item in items:
        assert item.error is None
        assert item.image.size == len(want[item.id]["bytes"])
        assert item_bytes(item) == want[item.id]["bytes"]
        assert item.prompt == want[item.id]["caption"]


def test_brace_pattern_reads_both_shards(shards):
    root, expected = shards
    items = read_images(str(root / "shard-{0..1}.tar"), "style.images")
    assert [i.id for i in items] == list(expected)
    assert all(item_bytes(i) == expected[i.id]["bytes"] for i in items)


def test_glob_of_tars(shards):
    root, expected = shards
    items = read_images(str(root / "shard-*.tar"), "style.images")
    assert sorted(i.id for i in items) == sorted(expected)


def test_tar_sample_without_image_gets_error(tmp_path):
    path = tmp_path / "mixed.tar"
    good = STYLE_FILES[0].read_bytes()
    _write_shard(path, [{"__key__": "good", "jpg": good, "txt": b"ok"},
                        {"__key__": "orphan", "txt": b"only a caption", "json": b"{}"}])
    items = {i.id: i for i in read_images(str(path), "style.images")}
    assert set(items) == {"mixed.tar/good", "mixed.tar/orphan"}
    assert items["mixed.tar/good"].error is None
    orphan = items["mixed.tar/orphan"]
    assert orphan.image is None
    assert orphan.error and "no image" in orphan.error
    assert orphan.prompt == "only a caption"


def test_truncated_tar_keeps_the_samples_before_the_cut(tmp_path):
    path = tmp_path / "cut.tar"
    files = STYLE_FILES[:3]
    _write_shard(path, [{"__key__": f"k{i}", f.suffix.lstrip("."): f.read_bytes()} for i, f in enumerate(files)])
    with tarfile.open(path) as tar:
        third = tar.getmember(f"k2{files[2].suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: third.offset_data + third.size // 2])  # cut inside the third image

    items = read_images(str(path), "style.images")  # must not raise
    by_id = {i.id: i for i in items}
    for i in (0, 1):
        assert item_bytes(by_id[f"cut.tar/k{i}"]) == files[i].read_bytes()
    assert list(by_id)[:2] == ["cut.tar/k0", "cut.tar/k1"]


def test_file_that_is_not_a_tar_is_a_source_error(tmp_path):
    path = tmp_path / "fake.tar"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(SourceError, match="style.images"):
        read_images(str(path), "style.images")


def test_parquet_manifest_with_relative_paths(tmp_path):
    (tmp_path / "m" / "img").mkdir(parents=True)
    rows = []
    for i, src in enumerate(STYLE_FILES[:3]):
        shutil.copy(src, tmp_path / "m" / "img" / src.name)
        rows.append({"image": f"img/{src.name}", "caption": f"prompt {i}"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m" / "manifest.parquet")

    items = read_images(str(tmp_path / "m" / "manifest.parquet"), "content.images")
    assert [i.prompt for i in items] == ["prompt 0", "prompt 1", "prompt 2"]
    assert len({i.id for i in items}) == 3
    for item, src in zip(items, STYLE_FILES[:3], strict=True):
        assert item_bytes(item) == src.read_bytes()

    prompts = read_prompts(str(tmp_path / "m" / "manifest.parquet"))
    assert [p.prompt for p in prompts] == ["prompt 0", "prompt 1", "prompt 2"]


def test_parquet_manifest_explicit_ids(tmp_path):
    shutil.copy(STYLE_FILES[0], tmp_path / "x.jpg")
    pq.write_table(pa.Table.from_pylist([{"id": "first", "path": "x.jpg"}, {"id": "second", "path": "x.jpg"}]),
                   tmp_path / "ids.parquet")
    items = read_images(str(tmp_path / "ids.parquet"), "style.images")
    assert [i.id for i in items] == ["first", "second"]
    assert all(i.prompt is None for i in items)


def test_parquet_manifest_integer_id_zero_is_an_id(tmp_path):
    shutil.copy(STYLE_FILES[0], tmp_path / "x.jpg")
    shutil.copy(STYLE_FILES[1], tmp_path / "y.jpg")
    pq.write_table(pa.Table.from_pylist([{"id": 0, "image": "x.jpg"}, {"id": 1, "image": "y.jpg"}]),
                   tmp_path / "ints.parquet")
    assert [i.id for i in read_images(str(tmp_path / "ints.parquet"), "style.images")] == ["0", "1"]


def test_jsonl_manifest_of_the_demo():
    path = DEMO / "captions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    items = read_images(str(path), "content.images")
    assert [i.prompt for i in items] == [r["prompt"] for r in rows]
    for item, row in zip(items, rows, strict=True):
        assert item_bytes(item) == (DEMO / row["image"]).read_bytes()


def test_jsonl_manifest_bad_line_is_a_source_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(SourceError, match="line 2"):
        read_prompts(str(path))


def test_txt_prompts_skip_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red fox\n\n   \n  a blue whale  \n\t\nthird one\n")
    items = read_prompts(str(path))
    assert [i.prompt for i in items] == ["a red fox", "a blue whale", "third one"]
    assert len({i.id for i in items}) == 3
    assert all(i.image is None for i in items)


def test_shared_prompts_file_reads_every_nonblank_line():
    path = SAMPLES / "prompts.txt"
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert [i.prompt for i in read_prompts(str(path))] == lines


def test_read_content_own_caption_wins_else_cyclic_prompt(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        shutil.copy(STYLE_FILES[0], tmp_path / name)
    rows = [{"image": "a.jpg", "prompt": "own caption"}, {"image": "b.jpg"}, {"image": "c.jpg"},
            {"image": "d.jpg", "prompt": None}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "p.txt").write_text("first\nsecond\n")
    items = read_content(str(tmp_path / "p.txt"), str(tmp_path / "c.jsonl"))
    # image i without a caption takes prompt i mod 2
    assert [i.prompt for i in items] == ["own caption", "second", "first", "second"]
    assert all(i.image is not None for i in items)


def test_read_content_prompts_only_and_images_only(tmp_path, nested_folder):
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    items = read_content(str(tmp_path / "p.txt"), None)
    assert [i.prompt for i in items] == ["one", "two"] and all(i.image is None for i in items)
    items = read_content(None, str(nested_folder))
    assert len(items) == 3 and all(i.prompt is None for i in items)


def test_missing_path_names_the_key(tmp_path):
    with pytest.raises(SourceError, match=r"style\.images"):
        read_images(str(tmp_path / "absent"), "style.images")
    with pytest.raises(SourceError, match=r"content\.prompts"):
        read_prompts(str(tmp_path / "absent.txt"))
    with pytest.raises(SourceError, match=r"content\.images"):
        read_content(None, str(tmp_path / "absent" / "*.jpg"))


def test_folder_without_images_is_a_source_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("hello")
    with pytest.raises(SourceError, match=r"style\.images.*no images"):
        read_images(str(tmp_path / "empty"), "style.images")


def test_unsupported_file_type_is_a_source_error(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match="unsupported"):
        read_images(str(tmp_path / "notes.csv"), "style.images")


def test_prompt_file_with_only_blank_lines_is_a_source_error(tmp_path):
    (tmp_path / "p.txt").write_text("\n  \n\n")
    with pytest.raises(SourceError, match="no prompts"):
        read_prompts(str(tmp_path / "p.txt"))


def test_tar_member_bytes_through_read_range_with_tarfile_written_tar(tmp_path):
    """A tar written by plain tarfile (not webdataset) with a directory prefix in member names."""
    path = tmp_path / "plain.tar"
    src = STYLE_FILES[4].read_bytes()
    with tarfile.open(path, "w") as tar:
        for name, data in (("dir/x1.jpg", src), ("dir/x1.txt", b" spaced caption \n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (item,) = read_images(str(path), "style.images")
    assert item.id == "plain.tar/dir/x1"
    assert item.prompt == "spaced caption"
    assert item_bytes(item) == src


@pytest.fixture()
def same_names_in_two_dirs(tmp_path: Path) -> Path:
    for sub, src in (("a", STYLE_FILES[0]), ("b", STYLE_FILES[1])):
        (tmp_path / sub).mkdir()
        shutil.copy(src, tmp_path / sub / "x.jpg")
        _write_shard(tmp_path / sub / "shard.tar", [{"__key__": "k", "jpg": src.read_bytes()}])
    return tmp_path


def test_brace_pattern_keeps_images_with_the_same_basename(same_names_in_two_dirs):
    items = read_images(str(same_names_in_two_dirs / "{a,b}" / "x.jpg"), "style.images")
    assert len(items) == 2
    assert {item_bytes(i) for i in items} == {STYLE_FILES[0].read_bytes(), STYLE_FILES[1].read_bytes()}


def test_glob_keeps_tars_with_the_same_basename(same_names_in_two_dirs):
    items = read_images(str(same_names_in_two_dirs / "*" / "shard.tar"), "style.images")
    assert len(items) == 2
    assert {item_bytes(i) for i in items} == {STYLE_FILES[0].read_bytes(), STYLE_FILES[1].read_bytes()}


def test_brace_glob_ids_have_no_parent_segments(same_names_in_two_dirs):
    items = read_images(str(same_names_in_two_dirs / "{a,b}" / "*.jpg"), "style.images")
    assert len(items) == 2 and len({i.id for i in items}) == 2
    assert all(".." not in i.id.split("/") for i in items), [i.id for i in items]
