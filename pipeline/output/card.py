"""``OUTPUT/README.md``: a dataset card, so a corpus explains itself to whoever finds it later.

Written from ``run.json``'s record and the index at the end of every run (and marked "in progress" at the
start), through the OutputStore so that it lands on S3 the same way as everything else. A ``README.md`` that
stylegen did not write (it does not start with the card's front matter, or is a link) is never replaced.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from pipeline.output.store import OutputStore
from pipeline.redact import public_config

log = logging.getLogger(__name__)

CARD = "README.md"
CARD_START = b"---\ntags: [stylegen,"  # how every card stylegen writes begins


def score_summary(values: list[float | None]) -> dict[str, float] | None:
    """n, mean, min, p10, median, p90, max of the finite values (None when there are none)."""
    xs = sorted(v for v in values if v is not None and math.isfinite(v))
    if not xs:
        return None

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"n": len(xs), "mean": sum(xs) / len(xs), "min": xs[0], "p10": q(0.1), "median": q(0.5),
            "p90": q(0.9), "max": xs[-1]}


def _score_table(index_rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| score | n | mean | min | p10 | median | p90 | max |", "|---|---|---|---|---|---|---|---|"]
    for name in ("clip_content", "clip_style"):
        s = score_summary([r.get(name) for r in index_rows])
        if s is None:
            lines.append(f"| {name} | 0 | | | | | | |")
        else:
            cells = " | ".join(f"{s[k]:.4f}" for k in ("mean", "min", "p10", "median", "p90", "max"))
            lines.append(f"| {name} | {s['n']} | {cells} |")
    return lines


def render_card(record: dict[str, Any], index_rows: list[dict[str, Any]], *, in_progress: bool = False) -> str:
    """The card's markdown from a run record (``run.json``'s layout) and the index rows."""
    cfg = public_config(record.get("config") or {})  # env var values and URL credentials never reach the card
    op, sc, out = cfg.get("operator") or {}, cfg.get("scoring") or {}, cfg.get("output") or {}
    flt, content, style = cfg.get("filter") or {}, cfg.get("content") or {}, cfg.get("style") or {}
    versions = record.get("versions") or {}
    counts = {"kept": 0, "rejected": 0, "failed": 0}
    for r in index_rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    planned = (record.get("dataset") or {}).get("planned")
    state = "in progress" if in_progress else ("complete" if (record.get("dataset") or {}).get("complete")
                                                  else "incomplete")
    name = os.path.basename(str(out.get("path", "")).rstrip("/")) or "stylegen dataset"
    fmt = out.get("image_format", "png")
    lines = [
        "---",
        "tags: [stylegen, image-stylization, synthetic]",
        "task_categories: [image-to-image, text-to-image]",
        "---",
        f"# {name}",
        "",
        f"A stylized image corpus made with `stylegen` (status: **{state}**"
        + (f", updated {record['finished_at']}" if record.get("finished_at") else "") + ").",
        "",
        "## What it is",
        "",
        f"Each sample pairs a content item (a prompt and/or an image) with a style reference and stores the "
        f"operator's output as `KEY.{'jpg' if fmt == 'jpeg' else fmt}` in WebDataset shards (`shards/*.tar`), "
        "with `KEY.json` (metadata, scores, operator settings) and `KEY.txt` (prompt)"
        + (" and the decoded inputs (`KEY.style.png`, `KEY.content.png`)" if out.get("include_inputs") else "")
        + ". `index/*.parquet` has one row per handled sample (kept, rejected, failed) with its reason, "
        "scores and the source locations of its inputs.",
        "",
        "## How it was made",
        "",
        f"- Operator: `{op.get('name')}`" + (f" on model `{op.get('model')}`" if op.get("model") else "")
        + f", params `{json.dumps(op.get('params') or {}, sort_keys=True)}`",
        f"- Content: prompts `{content.get('prompts')}`, images `{content.get('images')}`; "
        f"style images `{style.get('images')}`",
        f"- Pairing: `{json.dumps(cfg.get('pairing') or {}, sort_keys=True)}`",
        f"- Scoring: open_clip `{sc.get('clip_model')}` weights `{sc.get('clip_pretrained')}`; content score = "
        "cos(text(prompt), image(output)), style score = cos(image(style), image(output))",
        f"- Filter: min_content `{flt.get('min_content')}`, min_style `{flt.get('min_style')}`",
        f"- Operator config hash: `{record.get('operator_hash')}`",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if v),
        "",
        "Every sample can be regenerated from its recorded settings with `stylegen reproduce OUTPUT KEY`; "
        "`stylegen report OUTPUT` renders a visual report.",
        "",
        "## Counts",
        "",
        "| planned | kept | rejected | failed |",
        "|---|---|---|---|",
        f"| {planned if planned is not None else '?'} | {counts['kept']} | {counts['rejected']} | "
        f"{counts['failed']} |",
        "",
        "## Scores",
        "",
        *_score_table([r for r in index_rows if r["status"] != "failed"]),
        "",
    ]
    if record.get("scores_note"):
        lines += [f"**Note:** {record['scores_note']}.", ""]
    lines += [
        "## License",
        "",
        "The outputs are derived from the content and style inputs listed above: their use is bound by the "
        "licenses and terms of those inputs (and of the operator's and CLIP's model weights). stylegen records "
        "where every input came from (`content_id`, `style_id` and source URLs in the index) so that a sample "
        "can be traced back and removed if an input's terms require it. Check the inputs' licenses before "
        "redistributing this dataset.",
        "",
    ]
    return "\n".join(lines)


def write_text(store: OutputStore, name: str, text: str) -> None:
    """Commit a text file under the output root atomically (staged and renamed locally, one PUT on S3)."""
    def dump(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    store.write_file(f"{store.root}/{name}", dump, ".txt")


def write_card(store: OutputStore, record: dict[str, Any], *, in_progress: bool = False) -> None:
    """Write ``OUTPUT/README.md``; a card that cannot be written, or a README that is not stylegen's, is logged,
    never fatal to the run."""
    try:
        if _foreign_readme(store):
            log.warning("%s/%s was not written by stylegen: leaving it as it is (no dataset card)", store.url, CARD)
            return
        index = store.read_index(["status", "clip_content", "clip_style"]).to_pylist()
        write_text(store, CARD, render_card(record, index, in_progress=in_progress))
    except Exception as exc:
        log.warning("could not write the dataset card %s/%s: %s", store.url, CARD, exc)


def _foreign_readme(store: OutputStore) -> bool:
    path = f"{store.root}/{CARD}"
    if not store.remote and os.path.islink(path):
        return True
    try:
        with store.fs.open(path, "rb") as f:
            return not f.read(len(CARD_START)).startswith(CARD_START)
    except FileNotFoundError:
        return False
