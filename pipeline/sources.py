"""Source readers: list content and style items as metadata; bytes are fetched later, per sample.

Supported specs (local or any fsspec URL such as ``s3://``):
- a folder (recursive) or a glob of image files;
- WebDataset tars: ``x.tar``, ``shard-{000..009}.tar`` (brace expansion) or a glob of tars;
- manifests: ``.parquet`` / ``.jsonl`` with an image column (``image|path|url|file``, relative to the
  manifest) and/or a prompt column (``prompt|caption|text``), optional ``id``;
- prompt lists: ``.txt`` (one prompt per non-blank line), or a manifest with only prompts.

Tar members are indexed by offset so that a sample's image is later read with one ranged read; the
webdataset library streams whole tars and has no offset index, so that part is written here by hand.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import tarfile
from dataclasses import dataclass

import braceexpand
import pyarrow.parquet as pq

from pipeline.fs import full_url, get_fs, is_remote

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
PROMPT_COLUMNS = ("prompt", "caption", "text")
IMAGE_COLUMNS = ("image", "path", "url", "file")
TAR_EXTS = (".tar",)
MANIFEST_EXTS = (".parquet", ".jsonl")


class SourceError(ValueError):
    """A source that cannot be read at all (missing, empty, wrong format); the CLI exits 2."""


@dataclass(frozen=True)
class ImageRef:
    """Where an image's bytes live: a whole object, or ``size`` bytes at ``offset`` inside a tar."""

    url: str
    offset: int = 0
    size: int = -1


@dataclass(frozen=True)
class SourceItem:
    id: str
    image: ImageRef | None = None
    prompt: str | None = None
    error: str | None = None  # a sample known to be broken at listing time becomes a `failed` row


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _expand(spec: str) -> list[str]:
    """Brace-expand then glob a spec into concrete URLs (sorted, de-duplicated)."""
    urls: list[str] = []
    for part in braceexpand.braceexpand(spec):
        fs, path = get_fs(part)
        if _is_glob(path):
            urls.extend(full_url(fs, p) for p in sorted(fs.glob(path)))
        else:
            urls.append(part if is_remote(part) else full_url(fs, path))
    seen: dict[str, None] = dict.fromkeys(urls)
    return list(seen)


def _ext(path: str) -> str:
    return posixpath.basename(path).rsplit(".", 1)[-1].lower() if "." in posixpath.basename(path) else ""


def _check_exists(spec: str, key: str) -> None:
    fs, path = get_fs(spec)
    try:
        exists = fs.exists(path)
    except PermissionError:
        raise SourceError(f"{key}: access denied to {spec}") from None
    except Exception as exc:  # network, credentials, bucket missing: all mean "cannot read"
        raise SourceError(f"{key}: cannot reach {spec} ({exc.__class__.__name__}: {exc})") from None
    if not exists:
        raise SourceError(f"{key}: not found: {spec}")


def read_prompts(spec: str, key: str = "content.prompts") -> list[SourceItem]:
    """Read a prompt list (``.txt``, ``.jsonl``, ``.parquet``)."""
    urls = _expand(spec)
    if not urls:
        raise SourceError(f"{key}: no files match {spec}")
    items: list[SourceItem] = []
    for url in urls:
        _check_exists(url, key)
        if url.endswith(MANIFEST_EXTS):
            items.extend(i for i in _read_manifest(url, key) if i.prompt is not None)
            continue
        fs, path = get_fs(url)
        try:
            text = fs.cat_file(path).decode("utf-8")
        except UnicodeDecodeError:
            raise SourceError(f"{key}: {url} is not UTF-8 text") from None
        base = _relative_id(url, _id_root(get_fs(spec)[1]))
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                items.append(SourceItem(id=f"{base}:{lineno}", prompt=line.strip()))
    if not items:
        raise SourceError(f"{key}: no prompts in {spec}")
    return items


def read_images(spec: str, key: str) -> list[SourceItem]:
    """Read an image source of any supported kind into items (no pixels are read)."""
    fs, path = get_fs(spec)
    if not _is_glob(path) and "{" not in spec:
        _check_exists(spec, key)
        if fs.isdir(path):
            return _read_folder(fs, path, key)
    urls = _expand(spec)
    if not urls:
        raise SourceError(f"{key}: no files match {spec}")
    items: list[SourceItem] = []
    root = _id_root(path)
    for url in urls:
        if url.endswith(TAR_EXTS):
            items.extend(_read_tar(url, key, _relative_id(url, root)))
        elif url.endswith(MANIFEST_EXTS):
            items.extend(i for i in _read_manifest(url, key) if i.image is not None)
        elif _ext(url) in IMAGE_EXTS:
            items.append(SourceItem(id=_relative_id(url, root), image=ImageRef(url)))
        else:
            raise SourceError(f"{key}: unsupported source file {url} (expected images, .tar, .parquet, .jsonl)")
    if not items:
        raise SourceError(f"{key}: no images in {spec}")
    return _dedupe(items)


def _id_root(path: str) -> str:
    """The folder that ids are relative to: everything before the first brace or glob character's
    path component, so two matches never share an id and no id climbs out with ``..``."""
    cut = min((i for i in (path.find(ch) for ch in "{*?[") if i >= 0), default=len(path))
    return posixpath.dirname(path[:cut]) if cut < len(path) else posixpath.dirname(path)


def _relative_id(url: str, root: str) -> str:
    _, path = get_fs(url)
    return posixpath.relpath(path, root) if root else posixpath.basename(path)


def _read_folder(fs, path: str, key: str) -> list[SourceItem]:
    files = sorted(p for p in fs.find(path) if _ext(p) in IMAGE_EXTS)
    if not files:
        raise SourceError(f"{key}: no images in folder {path}")
    return [SourceItem(id=posixpath.relpath(p, path), image=ImageRef(full_url(fs, p))) for p in files]


def _dedupe(items: list[SourceItem]) -> list[SourceItem]:
    seen: set[str] = set()
    out = []
    for item in items:
        if item.id in seen:
            log.warning("duplicate source id %r: keeping the first occurrence", item.id)
            continue
        seen.add(item.id)
        out.append(item)
    return out


# WebDataset rule: the key is the path up to the first dot of the last path component.
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _read_tar(url: str, key: str, base: str) -> list[SourceItem]:
    """Index a WebDataset tar: image member offsets plus captions (txt/json), read with seeks only.
    Sample ids are ``<base>/<sample key>``."""
    fs, path = get_fs(url)
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            try:
                for info in tar:
                    if not info.isfile():
                        continue
                    match = _KEY_RE.match(info.name)
                    if not match:
                        continue
                    sample_key, ext = match.group(1), match.group(2).lower()
                    if sample_key not in members:
                        members[sample_key] = {}
                        order.append(sample_key)
                    members[sample_key][ext] = info
            except (tarfile.TarError, EOFError, OSError) as exc:
                log.warning("%s: %s is truncated or corrupt after %d samples (%s)", key, url, len(order), exc)
            captions = {k: _tar_caption(f, m) for k, m in members.items()}
    except tarfile.ReadError as exc:
        raise SourceError(f"{key}: {url} is not a readable tar ({exc})") from None
    items = []
    for sample_key in order:
        exts = members[sample_key]
        image_ext = next((e for e in IMAGE_EXTS if e in exts), None)
        info = exts.get(image_ext) if image_ext else None
        ref = ImageRef(url, info.offset_data, info.size) if info is not None else None
        error = None if ref else f"tar sample has no image member (has: {', '.join(sorted(exts))})"
        items.append(
            SourceItem(id=f"{base}/{sample_key}", image=ref, prompt=captions.get(sample_key), error=error)
        )
    return items


def _tar_caption(f, exts: dict[str, tarfile.TarInfo]) -> str | None:
    for ext in ("txt", "json"):
        info = exts.get(ext)
        if info is None or info.size > 1_000_000:
            continue
        f.seek(info.offset_data)
        raw = f.read(info.size)
        try:
            text = raw.decode("utf-8")
            if ext == "txt":
                return text.strip()
            obj = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(obj, dict):
            for col in PROMPT_COLUMNS:
                if isinstance(obj.get(col), str):
                    return obj[col].strip()
    return None


def _read_manifest(url: str, key: str) -> list[SourceItem]:
    fs, path = get_fs(url)
    try:
        if url.endswith(".parquet"):
            with fs.open(path, "rb") as f:
                rows = pq.read_table(f).to_pylist()
        else:
            rows = []
            text = fs.cat_file(path).decode("utf-8")
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise SourceError(f"{key}: {url} line {lineno} is not valid JSON") from None
                if not isinstance(row, dict):
                    raise SourceError(f"{key}: {url} line {lineno} is not a JSON object")
                rows.append(row)
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"{key}: cannot read manifest {url} ({exc.__class__.__name__})") from None
    base_dir = posixpath.dirname(path)
    base = posixpath.basename(path)
    items = []
    for index, row in enumerate(rows):
        image_col = next((c for c in IMAGE_COLUMNS if isinstance(row.get(c), str) and row[c]), None)
        prompt_col = next((c for c in PROMPT_COLUMNS if c in row and row[c] is not None), None)
        ref = None
        if image_col:
            target = row[image_col]
            if not is_remote(target) and not posixpath.isabs(target):
                target = posixpath.join(base_dir, target)
            ref = ImageRef(target if is_remote(target) else full_url(fs, target))
        raw_id = row.get("id")
        if raw_id is None or raw_id == "":
            raw_id = row[image_col] if image_col else f"{base}:{index + 1}"
        ident = str(raw_id)
        prompt = str(row[prompt_col]) if prompt_col else None
        items.append(SourceItem(id=ident, image=ref, prompt=prompt))
    return items


def read_content(prompts: str | None, images: str | None) -> list[SourceItem]:
    """Content items. With both prompts and images, image i takes its own caption if it has one,
    else prompt ``i mod len(prompts)``."""
    prompt_items = read_prompts(prompts) if prompts else []
    if not images:
        return _dedupe(prompt_items)
    image_items = read_images(images, "content.images")
    if not prompt_items:
        return image_items
    out = []
    for index, item in enumerate(image_items):
        prompt = item.prompt if item.prompt else prompt_items[index % len(prompt_items)].prompt
        out.append(SourceItem(id=item.id, image=item.image, prompt=prompt, error=item.error))
    return out

