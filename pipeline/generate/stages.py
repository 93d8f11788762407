"""Ray Data stages: decode (CPU tasks), stylize and score (actor pools), filter.

Every stage takes and returns pyarrow tables with one fixed schema (``ROW_SCHEMA``), so blocks stay
type-stable whatever mix of kept and failed rows they hold. A row carries ``status``: empty while in
flight, ``failed`` as soon as a stage gives up on it (later stages pass it through untouched), and
``kept``/``rejected`` after the filter. Images travel as encoded bytes.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
from typing import Any

import pyarrow as pa

from pipeline.config import DecodeConfig, OutputConfig, ScoreThresholds
from pipeline.generate.failures import (
    DeviceUnusable,
    FailureBreaker,
    device_unusable,
    free_device_memory,
    out_of_memory,
)
from pipeline.io.fs import RefusedInputError, read_range
from pipeline.io.images import (
    DecodeError,
    decode_image,
    encode_image,
    encode_transport,
    open_rgb,
    output_problem,
)
from pipeline.redact import redact_text
from pipeline.schema import FAILED, KEPT, REJECTED, ROW_SCHEMA
from pipeline.score_rules import score_reasons

log = logging.getLogger(__name__)


def to_rows(batch: pa.Table) -> list[dict[str, Any]]:
    return batch.to_pylist()


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def _fail(row: dict[str, Any], reason: str) -> None:
    row["status"] = FAILED
    row["reason"] = redact_text(reason)[:2000]  # reasons quote URLs and exception text: no credential in them
    row["image"] = None


def _pending(row: dict[str, Any]) -> bool:
    return not row.get("status")


def _fetch_decode(url: str | None, offset: int, size: int, cfg: DecodeConfig) -> bytes:
    try:
        data = read_range(url, offset, size, max_bytes=cfg.max_bytes)
    except FileNotFoundError:
        raise DecodeError(f"not found: {url}") from None
    except PermissionError:
        raise DecodeError(f"access denied: {url}") from None
    except RefusedInputError as exc:  # a FIFO, a device, too many bytes: refused before any read
        raise DecodeError(str(exc)) from None
    except Exception as exc:  # network, credentials, a vanished tar: this sample fails, the run goes on
        raise DecodeError(f"cannot read {url}: {exc.__class__.__name__}: {exc}") from None
    if size >= 0 and len(data) < size:
        raise DecodeError(f"truncated: {len(data)} of {size} bytes readable in {url}")
    return encode_transport(decode_image(data, max_pixels=cfg.max_pixels, max_side=cfg.max_side,
                                         max_aspect=cfg.max_aspect))


def decode_batch(batch: pa.Table, decode: dict[str, Any]) -> pa.Table:
    """Fetch and decode content/style bytes; a bad input fails its own row only."""
    cfg = DecodeConfig.model_validate(decode)
    rows = to_rows(batch)
    for row in rows:
        if row.get("error"):
            _fail(row, row["error"])
            continue
        for side in ("content", "style"):
            url = row[f"{side}_url"]
            if not url:
                continue
            try:
                row[f"{side}_bytes"] = _fetch_decode(url, row[f"{side}_offset"], row[f"{side}_size"], cfg)
            except DecodeError as exc:
                _fail(row, f"{side}: {exc}")
                break
            except Exception as exc:  # a decoder bug must cost one sample, not the decode task
                log.exception("unexpected error decoding %s of %s", side, row["key"])
                _fail(row, f"{side}: cannot decode image: {exc.__class__.__name__}: {exc}")
                break
    return to_table(rows)


def _worker_info(device: str) -> str:
    """Ray node id and the GPU ids Ray assigned to this actor, as JSON (gpu null when none was assigned)."""
    node = gpu = None
    try:
        import ray

        if ray.is_initialized():
            rctx = ray.get_runtime_context()
            node = rctx.get_node_id()
            gpus = rctx.get_accelerator_ids().get("GPU") or []
            gpu = ",".join(str(g) for g in gpus) or None
    except Exception:  # outside Ray (bare loops, notebooks) there is no runtime context
        pass
    return json.dumps({"node": node, "gpu": gpu, "device": device, "pid": os.getpid()})


FAULT_ENV = "STYLEGEN_FAULT_KILL_ONCE"


def _maybe_inject_fault() -> None:
    """Fault injection for crash tests: if $STYLEGEN_FAULT_KILL_ONCE names a file that does not exist yet,
    create it and kill this actor process mid-batch (as an OOM kill or a lost node would)."""
    marker = os.environ.get(FAULT_ENV)
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(137)


def pick_device(num_gpus: float) -> str:
    """The GPU Ray assigned (Ray narrows CUDA_VISIBLE_DEVICES, so it is always cuda:0 here), else CPU."""
    import torch

    return "cuda:0" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


class Stylizer:
    """Actor: loads the operator once, stylizes batches, isolates per-sample failures.

    Out of GPU memory, a batch is split in halves until its parts fit, and no call gets more than the largest size
    that fit from then on (``max_items``). An error that poisons the device makes the process exit
    (:class:`~pipeline.generate.failures.DeviceUnusable`) so that Ray retries the batch on a fresh one. A storm of
    one failure stops the run (:class:`~pipeline.generate.failures.FailureBreaker`).

    A GPU pool runs two calls per actor at once (``pipeline.generate.run.feeding_args``): one batch's CPU work
    (opening the inputs, encoding the outputs) overlaps the other's operator call, and ``device_lock`` keeps the
    operator to one call at a time, so the device runs batch after batch without waiting for the CPU between."""

    def __init__(self, operator: dict[str, Any], output: dict[str, Any]):
        from operators import build_operator

        self.device = pick_device(float(operator.get("num_gpus") or 0))
        self.op = build_operator(operator, device=self.device)
        self.device_lock = threading.Lock()
        self.output = OutputConfig.model_validate(output)
        self.worker = _worker_info(self.device)
        self.breaker = FailureBreaker(operator.get("failures"))
        self.max_items: int | None = None  # after an out-of-memory error: the most items one call may get
        self._announced: int | None = None
        # Loaded now, with the model, not after the first batch (without the open_clip package: see
        # simple_tokenizer), so the first call does not spend it while the device waits.
        clip_tokenizer()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = to_rows(batch)
        todo = [r for r in rows if _pending(r)]
        if todo:
            _maybe_inject_fault()
            self._stylize(todo)
        for row in rows:
            row["content_bytes"] = row["content_bytes"] if self.output.include_inputs else None
        return to_table(rows)

    def _items(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                "key": r["key"],
                "prompt": r["prompt"],
                "style": open_rgb(r["style_bytes"]),
                "content": open_rgb(r["content_bytes"]) if r["content_bytes"] else None,
                "seed": int(r["seed"]),
            }
            for r in rows
        ]

    def _stylize(self, rows: list[dict[str, Any]]) -> None:
        """Stylize ``rows`` in calls of at most ``max_items``."""
        start = 0
        while start < len(rows):
            size = self.max_items or len(rows)  # an out-of-memory error in one call lowers it for the next
            self._call(rows[start:start + size])
            start += size

    def _call(self, rows: list[dict[str, Any]]) -> None:
        oom = None
        try:
            items = self._items(rows)
            with self.device_lock:
                results = self.op(items)
            if not isinstance(results, list) or len(results) != len(rows):
                got = len(results) if isinstance(results, list) else type(results).__name__
                raise ValueError(f"operator returned {got} results for {len(rows)} items")
        except Exception as exc:
            poisoned = device_unusable(exc)
            if poisoned:  # every later call on this process would fail too: no sample is failed for it
                log.error("the device is unusable (%s); exiting so that Ray retries on a fresh process", poisoned)
                raise DeviceUnusable(poisoned) from None
            if out_of_memory(exc):
                oom = f"{exc.__class__.__name__}: {str(exc).strip()[:300]}"
            elif len(rows) == 1:
                self._failed(rows[0], f"operator error: {exc.__class__.__name__}: {exc}")
                return
            else:  # one bad sample must not fail its batch-mates: retry one by one
                log.warning("operator failed on a batch of %d (%s); retrying per sample", len(rows), exc)
                for row in rows:
                    self._call([row])
                return
        if oom is not None:  # out of the except block: the failed call's frames and their tensors are released
            self._shrink(rows, oom)
            return
        if self.max_items is not None and self._announced != self.max_items:
            self._announced = self.max_items
            log.warning("out of GPU memory at larger batches: sending at most %d items per operator call from now "
                        "on", self.max_items)
        for row, result in zip(rows, results, strict=True):
            try:
                self._accept(row, result)
            except Exception as exc:  # an output we cannot encode fails its sample only
                _fail(row, f"operator output unusable: {exc.__class__.__name__}: {exc}")
            self.breaker.record(row["reason"] if row.get("status") == FAILED else None)

    def _shrink(self, rows: list[dict[str, Any]], error: str) -> None:
        """Out of memory: free the cache, remember that ``len(rows)`` is too many, and try the halves."""
        free_device_memory()
        if len(rows) == 1:
            self._failed(rows[0], f"out of GPU memory even alone at batch size 1 ({error})")
            return
        half = (len(rows) + 1) // 2
        self.max_items = min(self.max_items or half, half)
        self._stylize(rows)

    def _failed(self, row: dict[str, Any], reason: str) -> None:
        _fail(row, reason)
        self.breaker.record(row["reason"])

    def _accept(self, row: dict[str, Any], result: dict[str, Any]) -> None:
        """Write nothing an operator got wrong: errors, non-images, NaN and all-black outputs fail the row."""
        if not isinstance(result, dict):
            _fail(row, f"operator returned {type(result).__name__}, not a result dict")
            return
        if result.get("error"):
            _fail(row, f"operator: {result['error']}")
            return
        image = result.get("image")
        problem = output_problem(image)
        if problem:
            _fail(row, f"operator {problem}")
            return
        meta = dict(result.get("meta") or {})
        meta.update(prompt_meta(row["prompt"]))
        meta["worker"] = json.loads(self.worker)
        row["image"] = encode_image(image, self.output.image_format, self.output.jpeg_quality)
        row["meta"] = json.dumps(meta, sort_keys=True, default=str)
        row["worker"] = self.worker


CLIP_TEXT_TOKENS = 75  # CLIP's 77-token context minus start and end: the scorer and SD text encoders cut here


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    from operators.clip_score import simple_tokenizer

    return simple_tokenizer()


def prompt_meta(prompt: str | None) -> dict[str, Any]:
    """How much of the prompt CLIP sees: long prompts are kept whole in the index and ``txt`` but CLIP (the
    scorer, and SD/Flux's CLIP text encoder) truncates them, so the sample records that it did."""
    if prompt is None:
        return {}
    tokens = len(clip_tokenizer().encode(prompt))
    return {"prompt_chars": len(prompt), "prompt_clip_tokens": tokens, "prompt_truncated": tokens > CLIP_TEXT_TOKENS}


class Scorer:
    """Actor: CLIP content and style scores and the quality heads (on the same output embedding), then the
    filter thresholds."""

    def __init__(self, scoring: dict[str, Any], filter: dict[str, Any], include_inputs: bool = False):
        from operators.clip_score import ClipScorer
        from operators.heads import HeadSet

        self.include_inputs = include_inputs
        self.device = pick_device(float(scoring.get("num_gpus") or 0))
        self.scorer = ClipScorer(scoring["clip_model"], scoring["clip_pretrained"], device=self.device)
        self.heads = HeadSet(scoring.get("heads") or {}, self.scorer.embed_dim, device=self.device)
        self.filter = ScoreThresholds.model_validate(filter)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = to_rows(batch)
        todo = [r for r in rows if _pending(r)]
        if todo:
            outputs = [open_rgb(r["image"]) for r in todo]
            styles = [(r["style_id"], open_rgb(r["style_bytes"])) for r in todo]
            emb = self.scorer.embed_images(outputs)
            content, style = self.scorer.score_embedded(emb, [r["prompt"] for r in todo], styles)
            heads = self.heads.rows(emb) if self.heads else [None] * len(todo)
            for row, c, s, h in zip(todo, content, style, heads, strict=True):
                row["clip_content"], row["clip_style"] = c, s
                row["scores"] = json.dumps(h, sort_keys=True) if h is not None else None
                apply_filter(row, self.filter, h)
        for row in rows:
            if not row.get("status"):
                row["status"] = KEPT
            if not self.include_inputs:  # inputs are not written: do not carry them to the sink
                row["style_bytes"] = row["content_bytes"] = None
        return to_table(rows)


def apply_filter(row: dict[str, Any], cfg: ScoreThresholds, scores: dict[str, float] | None = None) -> None:
    """Mark a scored row ``rejected`` with the reason when it misses a threshold, else ``kept``."""
    reasons = []
    c, s = row.get("clip_content"), row.get("clip_style")
    if cfg.min_content is not None and c is not None and c < cfg.min_content:
        reasons.append(f"clip_content {c:.4f} < min_content {cfg.min_content}")
    if cfg.min_style is not None and s is not None and s < cfg.min_style:
        reasons.append(f"clip_style {s:.4f} < min_style {cfg.min_style}")
    for name, value in (("clip_content", c), ("clip_style", s)):
        if value is not None and not math.isfinite(value):
            reasons.append(f"{name} is not finite")
    reasons += score_reasons(scores, cfg.min_scores, cfg.max_scores)
    row["status"] = REJECTED if reasons else KEPT
    row["reason"] = "; ".join(reasons) or None
