"""``stylegen report``: one HTML page to look at a dataset, finished or not, local or on S3.

Everything comes from the output itself: the index (every handled sample), the shards (the stored outputs and,
with ``include_inputs``, the inputs), ``run.json`` when the run finished (config, thresholds, versions) and,
for inputs not stored in the shards, the source URLs recorded in the index. The page needs no network: CSS is
inline, the contact sheet and histograms are PNG files beside it, table thumbnails are data: URIs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from pipeline.output.card import score_summary
from pipeline.output.store import OutputStore
from pipeline.redact import is_redacted, public_config, redact_text
from pipeline.review.untrusted import (
    DEFAULT_MAX_PIXELS,
    UntrustedValue,
    max_pixels_of,
    open_stored,
    read_member,
    shard_problem,
    shard_url,
    status_class,
)

log = logging.getLogger(__name__)

TILE = 160  # contact-sheet panel side
CAPTION_H = 34  # two caption lines under each sample
SAMPLES_PER_ROW = 2
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
HIST_SIZE = (520, 260)
HIST_BINS = 30
SCORES = ("clip_content", "clip_style")
THRESHOLDS = {"clip_content": "min_content", "clip_style": "min_style"}


@dataclass
class SampleImages:
    output: Image.Image | None = None
    style: Image.Image | None = None
    content: Image.Image | None = None


@dataclass
class Report:
    html: str
    contact_sheet: str | None
    histograms: dict[str, str]
    counts: dict[str, int]
    sheet_samples: int
    sheet_columns: list[str] = field(default_factory=list)


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def score_of(row: dict[str, Any]) -> float | None:
    """Ranking score: the mean of the finite CLIP scores the row has (None when it has none)."""
    vals = [_num(row.get(k)) for k in SCORES]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def _num(value: Any) -> float | None:
    """A finite float, or None for anything else (an edited index may hold strings where scores belong)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def reason_kind(reason: str | None) -> str:
    """A reason without its specifics (numbers, paths), so that like failures group together."""
    if not reason:
        return "(none)"
    text = re.sub(r"(s3|gs|https?|file)://\S+|(?<![\w.])/\S+", "<path>", reason)
    text = re.sub(r"-?\d+(\.\d+)?", "#", text)
    return text[:160]


# ---- reading the output ---------------------------------------------------------------------------------------
def read_rows(store: OutputStore) -> list[dict[str, Any]]:
    """All index rows, tolerating index files written before newer columns existed."""
    table = store.read_tables("index", None, skip_damaged=True)
    if "status" not in table.column_names:
        return []
    return table.to_pylist()


def load_stored(store: OutputStore, rows: list[dict[str, Any]],
                max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, SampleImages]:
    """Output (and stored input) images of kept rows, one pass per shard. A row whose ``shard`` is not a plain
    file name under ``shards/`` is skipped with a warning; images decode under ``max_pixels``."""
    by_shard: dict[str, set[str]] = {}
    for r in rows:
        if r.get("status") == "kept" and r.get("shard"):
            problem = shard_problem(r["shard"])
            if problem:
                log.warning("skipping index row %s: %s", r.get("key"), problem)
                continue
            by_shard.setdefault(r["shard"], set()).add(r["key"])
    found: dict[str, SampleImages] = {}
    for shard, keys in sorted(by_shard.items()):
        try:
            with store.fs.open(shard_url(store.shards, shard), "rb") as f, tarfile.open(fileobj=f) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if key not in keys or not member.isfile():
                        continue
                    slot = ("style" if ext.startswith("style.") else "content" if ext.startswith("content.")
                            else "output" if ext in IMAGE_EXTS else None)
                    if slot is None:
                        continue
                    try:
                        im = open_stored(read_member(tar, member), max_pixels)
                    except UntrustedValue as exc:
                        log.warning("shard %s: skipping %s: %s", shard, member.name, exc)
                        continue
                    setattr(found.setdefault(key, SampleImages()), slot, im)
        except Exception as exc:  # a missing or unreadable shard shows as empty tiles, not a failed report
            log.warning("cannot read shard %s: %s", shard, exc)
    return found


def _decode_cfg(config: dict[str, Any] | None) -> dict[str, Any]:
    d = (config or {}).get("decode") or {}
    return {"max_pixels": d.get("max_pixels", 64_000_000), "max_side": d.get("max_side", 512),
            "max_aspect": d.get("max_aspect")}


def _plan_refs(config: dict[str, Any] | None, keys: set[str]) -> dict[str, dict[str, Any]]:
    """Input locations from re-planning the run's config: for index files written before they were recorded."""
    if not config or not keys:
        return {}
    try:
        from pipeline.config import validate_config
        from pipeline.plan.keys import build_plan

        return {s.key: s.to_row() for s in build_plan(validate_config(config, untrusted=True)) if s.key in keys}
    except Exception as exc:
        log.warning("cannot re-plan the run to find its inputs: %s", exc)
        return {}


def read_input(ref: dict[str, Any], side: str, decode: dict[str, Any],
               sources: dict[str, Any] | None = None) -> Image.Image | None:
    """An input decoded as the pipeline decoded it, from its recorded source location (None if unavailable).
    The URL comes from an index (data): it gets the run's protocol allow-list and byte cap (``sources``)."""
    from pipeline.io.fs import check_protocol, read_range
    from pipeline.io.images import decode_image

    url = ref.get(f"{side}_url")
    if not url or not isinstance(url, str):
        return None
    if is_redacted(url):
        log.warning("not re-reading %s input of %s: source URL carried credentials and was not stored (%s)", side,
                    ref.get("key"), url)
        return None
    offset, size = ref.get(f"{side}_offset") or 0, ref.get(f"{side}_size")
    sources = sources or {}
    try:
        check_protocol(url, sources.get("protocols"))
        data = read_range(url, offset, -1 if size is None else size, max_bytes=sources.get("max_bytes"))
        return decode_image(data, **decode)
    except Exception as exc:
        log.warning("cannot re-read %s input %s: %s", side, url, exc)
        return None


def fill_inputs(images: dict[str, SampleImages], rows: dict[str, dict[str, Any]],
                config: dict[str, Any] | None) -> None:
    """Style/content not stored in the shards (run without include_inputs): re-read them from their sources."""
    decode = _decode_cfg(config)
    limits = {"protocols": ((config or {}).get("sources") or {}).get("protocols"),
              "max_bytes": ((config or {}).get("decode") or {}).get("max_bytes", 64 * 2**20)}
    missing = {k for k, im in images.items() if im.style is None or im.content is None}
    no_refs = {k for k in missing if not rows[k].get("style_url")}
    planned = _plan_refs(config, no_refs)
    for key in sorted(missing):
        ref = planned.get(key, rows[key])
        im = images[key]
        if im.style is None:
            im.style = read_input(ref, "style", decode, limits)
        if im.content is None:
            im.content = read_input(ref, "content", decode, limits)


# ---- drawing ----------------------------------------------------------------------------------------------------
def _fit(im: Image.Image | None, side: int, label: str) -> Image.Image:
    tile = Image.new("RGB", (side, side), (236, 236, 236))
    if im is None:
        ImageDraw.Draw(tile).text((8, side // 2 - 6), f"no {label}", fill=(120, 120, 120), font=_font(12))
        return tile
    im = im.copy()
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    tile.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return tile


def _fmt(v: Any) -> str:
    v = _num(v)
    return "—" if v is None else f"{v:.3f}"


def contact_sheet(samples: list[tuple[dict[str, Any], SampleImages]], columns: list[str],
                  tile: int = TILE, per_row: int = SAMPLES_PER_ROW) -> Image.Image:
    """Each sample is ``columns`` panels (content | style | output) above a caption with its key and scores;
    ``per_row`` samples side by side. Size: ``per_row*len(columns)*tile`` x ``rows*(tile+CAPTION_H)``."""
    cell_w, cell_h = len(columns) * tile, tile + CAPTION_H
    rows = max(1, math.ceil(len(samples) / per_row))
    sheet = Image.new("RGB", (per_row * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(12)
    for i, (row, ims) in enumerate(samples):
        x0, y0 = (i % per_row) * cell_w, (i // per_row) * cell_h
        for j, col in enumerate(columns):
            sheet.paste(_fit(getattr(ims, col), tile, col), (x0 + j * tile, y0))
        draw.text((x0 + 4, y0 + tile + 2), f"{row['key']}  ({' | '.join(columns)})", fill=(20, 20, 20), font=font)
        draw.text((x0 + 4, y0 + tile + 17),
                  f"content {_fmt(row.get('clip_content'))}   style {_fmt(row.get('clip_style'))}",
                  fill=(60, 60, 160), font=font)
        draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], outline=(200, 200, 200))
    return sheet


def histogram(values: dict[str, list[float]], title: str, threshold: float | None,
              size: tuple[int, int] = HIST_SIZE, bins: int = HIST_BINS) -> Image.Image:
    """Stacked histogram of scores by status (kept green, rejected red) with the threshold as a vertical line."""
    w, h = size
    left, right, top, bottom = 44, 12, 24, 36
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    font = _font(12)
    d.text((left, 4), title, fill=(0, 0, 0), font=font)
    allv = [v for vs in values.values() for v in vs if math.isfinite(v)]
    if not allv:
        d.text((left, h // 2), "no scores", fill=(120, 120, 120), font=font)
        return im
    lo, hi = min(allv + ([threshold] if threshold is not None else [])), max(
        allv + ([threshold] if threshold is not None else []))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    span = hi - lo
    counts = {s: [0] * bins for s in values}
    for status, vs in values.items():
        for v in vs:
            if math.isfinite(v):
                counts[status][min(bins - 1, int((v - lo) / span * bins))] += 1
    peak = max(sum(c[b] for c in counts.values()) for b in range(bins)) or 1
    pw, ph = w - left - right, h - top - bottom
    colours = {"kept": (64, 160, 90), "rejected": (210, 80, 70)}
    for b in range(bins):
        base = 0
        for status in ("kept", "rejected"):
            n = counts.get(status, [0] * bins)[b]
            if not n:
                continue
            x0 = left + b * pw / bins
            y1 = top + ph - base * ph / peak
            y0 = top + ph - (base + n) * ph / peak
            d.rectangle([x0 + 1, y0, x0 + pw / bins - 1, y1], fill=colours[status])
            base += n
    d.line([left, top + ph, left + pw, top + ph], fill=(0, 0, 0))
    d.line([left, top, left, top + ph], fill=(0, 0, 0))
    for frac in (0.0, 0.5, 1.0):
        x = left + frac * pw
        d.line([x, top + ph, x, top + ph + 4], fill=(0, 0, 0))
        anchor = {0.0: "la", 0.5: "ma", 1.0: "ra"}[frac]
        d.text((x, top + ph + 6), f"{lo + frac * span:.3f}", fill=(0, 0, 0), font=font, anchor=anchor)
    d.text((4, top - 2), str(peak), fill=(0, 0, 0), font=font)
    d.text((4, top + ph - 12), "0", fill=(0, 0, 0), font=font)
    if threshold is not None:
        x = left + (threshold - lo) / span * pw
        for y in range(top, top + ph, 8):
            d.line([x, y, x, y + 4], fill=(200, 0, 0), width=2)
        d.text((min(x + 4, w - 110), top), f"threshold {threshold:g}", fill=(200, 0, 0), font=font)
    d.text((w - right - 150, h - 14), "kept", fill=colours["kept"], font=font)
    d.text((w - right - 100, h - 14), "rejected", fill=colours["rejected"], font=font)
    return im


# ---- HTML -------------------------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.muted{color:#777} .warn{background:#fff4d6;border:1px solid #e8c76a;padding:8px 12px;border-radius:4px}
table{border-collapse:collapse;background:#fff} td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;
vertical-align:top} th{background:#f0f0f0} td.num{text-align:right;font-variant-numeric:tabular-nums}
.kept{color:#2f7d45;font-weight:600} .rejected{color:#b8402f;font-weight:600} .failed{color:#7a3db8;font-weight:600}
.cards{display:flex;gap:12px;flex-wrap:wrap} .card{background:#fff;border:1px solid #ddd;border-radius:6px;
padding:10px 16px;min-width:110px} .card b{display:block;font-size:24px}
pre{background:#fff;border:1px solid #ddd;padding:10px;overflow:auto;max-height:420px;font-size:12px}
img.plot{border:1px solid #ddd;background:#fff;margin-right:12px} img.thumb{width:64px;height:64px;
object-fit:contain;background:#eee} code{font-size:12px}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _thumb(im: Image.Image | None) -> str:
    if im is None:
        return ""
    im = im.copy()
    im.thumbnail((64, 64))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return f'<img class="thumb" alt="" src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _rank_table(rows: list[dict[str, Any]], images: dict[str, SampleImages]) -> str:
    head = ("<tr><th>#</th><th>output</th><th>style</th><th>key</th><th>status</th><th>clip_content</th>"
            "<th>clip_style</th><th>prompt</th><th>style_id</th><th>reason</th></tr>")
    body = []
    for i, r in enumerate(rows, 1):
        ims = images.get(r["key"], SampleImages())
        body.append(
            f"<tr><td class=num>{i}</td><td>{_thumb(ims.output)}</td><td>{_thumb(ims.style)}</td>"
            f"<td><code>{_e(r['key'])}</code></td><td class={status_class(r['status'])}>{_e(r['status'])}</td>"
            f"<td class=num>{_fmt(r.get('clip_content'))}</td><td class=num>{_fmt(r.get('clip_style'))}</td>"
            f"<td>{_e(str(r.get('prompt') or '')[:120])}</td><td>{_e(r.get('style_id'))}</td>"
            f"<td>{_e(redact_text(r.get('reason')))}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>" if body else "<p class=muted>no scored samples</p>"


def render_html(*, output: str, record: dict[str, Any] | None, rows: list[dict[str, Any]],
                counts: dict[str, int], reasons: list[tuple[str, str, int, str]], sheet: str | None,
                sheet_n: int, hists: dict[str, str], worst: list[dict[str, Any]], best: list[dict[str, Any]],
                images: dict[str, SampleImages]) -> str:
    config = (record or {}).get("config")
    config = config if isinstance(config, dict) else None
    planned = ((record or {}).get("dataset") or {}).get("planned")
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>stylegen report: {_e(output)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>stylegen report</h1><div class=muted><code>{_e(output)}</code>"
             + (f" · finished {_e(record.get('finished_at'))}" if record and record.get("finished_at") else "")
             + "</div>"]
    if record is None:
        parts.append(f"<p class=warn>No <code>run.json</code>: a partial or still-running job. This report shows "
                     f"the {len(rows)} samples committed so far; thresholds and configuration are unknown.</p>")
    elif record.get("scores_note"):
        parts.append(f"<p class=warn>{_e(record['scores_note'])}.</p>")
    cards = [("handled", len(rows))] + ([("planned", planned)] if planned is not None else [])
    cards += [(k, counts.get(k, 0)) for k in ("kept", "rejected", "failed")]
    parts.append("<h2>Counts</h2><div class=cards>" + "".join(
        f"<div class=card><span class={status_class(k)}>{_e(k)}</span><b>{_e(v)}</b></div>" for k, v in cards)
        + "</div>")
    parts.append("<h2>Rejections and failures by reason</h2>")
    if reasons:
        parts.append("<table><tr><th>status</th><th>reason</th><th>count</th><th>example</th></tr>" + "".join(
            f"<tr><td class={status_class(s)}>{_e(s)}</td><td>{_e(kind)}</td><td class=num>{n}</td>"
            f"<td>{_e(ex)}</td></tr>"
            for s, kind, n, ex in reasons) + "</table>")
    else:
        parts.append("<p class=muted>none</p>")
    parts.append("<h2>Score distributions</h2><div>" + "".join(
        f'<img class=plot alt="{_e(name)} histogram" src="{_e(path)}">' for name, path in hists.items()) + "</div>")
    stats = []
    for name in SCORES:
        s = score_summary([r.get(name) for r in rows if r.get("status") != "failed"])
        if s:
            stats.append(f"<tr><td>{name}</td><td class=num>{s['n']}</td>" + "".join(
                f"<td class=num>{s[k]:.4f}</td>" for k in ("mean", "min", "p10", "median", "p90", "max")) + "</tr>")
    if stats:
        parts.append("<table><tr><th>score</th><th>n</th><th>mean</th><th>min</th><th>p10</th><th>median</th>"
                     "<th>p90</th><th>max</th></tr>" + "".join(stats) + "</table>")
    parts.append(f"<h2>Contact sheet</h2><p class=muted>{sheet_n} kept samples (by key); under each: the key and "
                 "the CLIP content and style scores.</p>")
    parts.append(f'<img alt="contact sheet" style="max-width:100%" src="{_e(sheet)}">' if sheet
                 else "<p class=muted>no kept samples yet</p>")
    parts.append("<h2>Worst samples</h2><p class=muted>lowest mean of the CLIP scores</p>")
    parts.append(_rank_table(worst, images))
    parts.append("<h2>Best samples</h2>")
    parts.append(_rank_table(best, images))
    parts.append("<h2>Configuration</h2>")
    if config is not None:
        parts.append(f"<pre>{_e(json.dumps(public_config(config), indent=2, sort_keys=True))}</pre>")
        versions = (record or {}).get("versions")
        versions = versions if isinstance(versions, dict) else {}
        parts.append("<p class=muted>" + _e(", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if v))
                     + "</p>")
    else:
        parts.append("<p class=muted>unknown (no run.json)</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---- entry point ------------------------------------------------------------------------------------------------
def default_out(output: str) -> str:
    """OUTPUT/report for a local output, ./report for a remote one."""
    store_remote = "://" in output and not output.startswith("file://")
    return "report" if store_remote else os.path.join(output.removeprefix("file://"), "report")


def make_report(output: str, out_dir: str | None = None, *, max_samples: int = 24, table_rows: int = 10) -> Report:
    """Write ``report.html``, ``contact_sheet.png`` and the histograms into ``out_dir``; return what was made."""
    store = OutputStore(output)
    out_dir = out_dir or default_out(output)
    os.makedirs(out_dir, exist_ok=True)
    record = store.read_json("run.json")
    record = record if isinstance(record, dict) else None  # an edited run.json is data, not a crash
    config = (record or {}).get("config")
    config = config if isinstance(config, dict) else None
    rows = sorted(read_rows(store), key=lambda r: str(r["key"]))
    by_key = {r["key"]: r for r in rows}
    counts = Counter(r["status"] for r in rows)

    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["status"] != "kept":
            reason = redact_text(str(r.get("reason") or ""))  # outputs written before redaction existed
            groups.setdefault((r["status"], reason_kind(reason)), []).append(reason)
    reasons = sorted(((s, k, len(v), v[0]) for (s, k), v in groups.items()), key=lambda t: (-t[2], t[0], t[1]))

    scored = sorted((r for r in rows if score_of(r) is not None), key=lambda r: (score_of(r), r["key"]))
    worst, best = scored[:table_rows], scored[::-1][:table_rows]
    sheet_rows = [r for r in rows if r["status"] == "kept"][:max_samples]
    wanted = {r["key"]: r for r in [*sheet_rows, *worst, *best]}
    images = load_stored(store, list(wanted.values()), max_pixels_of(config))
    for r in wanted.values():  # rejected rows have no stored output but their inputs are still worth showing
        images.setdefault(r["key"], SampleImages())
    fill_inputs(images, by_key, config)

    sheet_path, columns = None, []
    if sheet_rows:
        has_content = any(images[r["key"]].content is not None for r in sheet_rows)
        columns = (["content"] if has_content else []) + ["style", "output"]
        sheet = contact_sheet([(r, images[r["key"]]) for r in sheet_rows], columns)
        sheet.save(os.path.join(out_dir, "contact_sheet.png"), optimize=True)
        sheet_path = "contact_sheet.png"

    filt = (config or {}).get("filter") or {}
    hists = {}
    for name in SCORES:
        values = {s: [r[name] for r in rows if r["status"] == s and r.get(name) is not None]
                  for s in ("kept", "rejected")}
        threshold = filt.get(THRESHOLDS[name])
        title = f"{name} (n={sum(map(len, values.values()))})" + ("" if threshold is not None else ", no threshold")
        histogram(values, title, threshold).save(os.path.join(out_dir, f"hist_{name}.png"))
        hists[name] = f"hist_{name}.png"

    page = render_html(output=output, record=record, rows=rows, counts=dict(counts), reasons=reasons,
                       sheet=sheet_path, sheet_n=len(sheet_rows), hists=hists, worst=worst, best=best,
                       images=images)
    html_path = os.path.join(out_dir, "report.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(page)
    log.info("report: %s (%d rows)", html_path, len(rows))
    return Report(html=html_path, contact_sheet=os.path.join(out_dir, sheet_path) if sheet_path else None,
                  histograms={k: os.path.join(out_dir, v) for k, v in hists.items()}, counts=dict(counts),
                  sheet_samples=len(sheet_rows), sheet_columns=columns)
