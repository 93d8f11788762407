"""A small corpus of every source kind and the plan configs over it whose keys are recorded in
``tests/data/plan_keys.json``: an upgrade of stylegen must never move a key (it would redo finished outputs).

Ids are relative to the corpus root, so the keys do not depend on where the corpus is built."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.unit_helpers import solid_png, wds_tar

RECORDED = Path(__file__).parent / "data" / "plan_keys.json"


def build_corpus(root: Path) -> Path:
    """Styles (folder), content images (folder with a subfolder), two tars, parquet/jsonl manifests (images and
    prompts, a duplicate id across files) and a txt prompt list."""
    png = [solid_png((i * 20 % 256, 40, 200 - i * 9)) for i in range(24)]
    for sub, names in (("style", [f"s{i:02d}.png" for i in range(7)]),
                       ("content", ["c0.png", "c1.png", "deep/c2.png", "deep/c3.png"])):
        for i, name in enumerate(names):
            (root / sub / name).parent.mkdir(parents=True, exist_ok=True)
            (root / sub / name).write_bytes(png[i + (0 if sub == "style" else 10)])
    (root / "tars").mkdir()
    wds_tar(root / "tars" / "shard-000.tar", {"a": {"png": png[1], "txt": b"a red fox"}, "b": {"png": png[2]},
                                           "c": {"txt": b"no image"}})
    wds_tar(root / "tars" / "shard-001.tar", {"d": {"jpg": png[3], "json": b'{"caption": "a harbour"}'}})
    (root / "manifests").mkdir()
    pq.write_table(pa.table({"id": ["m1", "m2", "dup"], "image": ["../content/c0.png", "../content/c1.png",
                                                                    "../content/deep/c2.png"],
                             "prompt": ["a castle", None, "a bridge"]}), root / "manifests" / "a.parquet")
    (root / "manifests" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"id": "dup", "image": "../content/deep/c3.png", "caption": "shadowed"},
        {"image": "../content/c1.png", "caption": "no id"}, {"id": "p-only", "prompt": "just words"}]) + "\n")
    (root / "prompts.txt").write_text("a lighthouse\n\n  a forest at dawn  \na city\x07 at night\n")
    (root / "prompts.jsonl").write_text('{"prompt": "first"}\n{"caption": "second", "id": "x"}\n')
    return root


def cases(root: Path) -> dict[str, dict]:
    """name -> config overrides (as a dict tree) for a plan over ``build_corpus(root)``."""
    style = {"images": str(root / "style")}
    # the manifests point at ../content: a sibling folder, reachable only as a named root
    base = {"output": {"path": str(root / "out")}, "style": style, "sources": {"roots": [str(root / "content")]}}

    def case(content: dict, **pairing) -> dict:
        return {**base, "content": {"prompts": None, "images": None, **content}, "pairing": pairing}

    return {
        "folder": case({"images": str(root / "content")}, styles_per_content=2),
        "glob": case({"images": str(root / "content" / "**" / "*.png")}, styles_per_content=3, seeds_per_pair=2),
        "tar": case({"images": str(root / "tars" / "shard-{000..001}.tar")}, styles_per_content=1),
        "tar_glob_prompts": case({"images": str(root / "tars" / "*.tar"), "prompts": str(root / "prompts.txt")},
                                 styles_per_content=2, seed=7),
        "parquet": case({"images": str(root / "manifests" / "a.parquet")}, styles_per_content=2),
        "jsonl": case({"images": str(root / "manifests" / "b.jsonl")}, styles_per_content=1, seeds_per_pair=3),
        "manifests_glob_dup_ids": case({"images": str(root / "manifests" / "*")}, styles_per_content=2),
        "txt": case({"prompts": str(root / "prompts.txt")}, styles_per_content=7),
        "jsonl_prompts": case({"prompts": str(root / "prompts.jsonl")}, styles_per_content=4, seed=3),
        "images_with_prompt_pool": case({"images": str(root / "content"), "prompts": str(root / "prompts.txt")},
                                        styles_per_content=2),
        "limit": case({"images": str(root / "content")}, styles_per_content=3, seeds_per_pair=2, limit=9),
        "limit_zero": case({"prompts": str(root / "prompts.txt")}, limit=0),
        "all_styles_of_few": case({"prompts": str(root / "prompts.txt")}, styles_per_content=50),
    }
