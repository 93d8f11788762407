"""Whose folder is it: an output is stylegen's only when stylegen made it (docs/architecture.md §5.6).

``run``, ``filter`` and ``verify --repair`` move, replace and quarantine files of their output; that is safe only in
a folder stylegen created. So an output gets a small marker ``OUTPUT/.stylegen`` (json: tool, version, created,
kind) before anything else is written there, and a non-empty folder without it is refused with one line naming
the folder and a few of its entries; nothing is created or moved. Outputs of earlier versions (no marker) are
recognised by a ``run.json`` or an index file that stylegen wrote, and get the marker then.

The layout entries (``shards/``, ``index/``, ``_tmp/``, ``_quarantine/``, ``_superseded/`` folders and the
``_lease`` file) must be what they should be; a symlink, or a file where a folder belongs, is refused, never
followed. On S3 there are no links and no empty folders: an object under the prefix makes it non-empty.

Sources and output must not overlap (:func:`check_overlap`): no input under ``output.path`` and no output inside a
source root, compared on normalised paths (realpath locally, bucket/key on S3).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import posixpath
import stat
import time
from collections.abc import Iterable
from typing import Any

import braceexpand
import pyarrow.parquet as pq

from pipeline.io.fs import file_kind, get_fs, is_remote, local_path
from pipeline.io.sources import SourceError

MARKER = ".stylegen"
LAYOUT_DIRS = ("shards", "index", "_tmp", "_quarantine", "_superseded")
LAYOUT_FILES = ("_lease", "_progress.json")
# What an interrupted older stylegen leaves before its first file: an output holding only these is still empty.
_EMPTY_LAYOUT = {"shards", "index", "_tmp", "_lease", "_progress.json"}
# Index columns that identify an index file written by stylegen (any version).
_INDEX_FIELDS = {"key", "status", "reason", "shard", "content_id", "style_id", "seed"}
_SHOWN = 5  # entries named in a refusal
_MAX_BRACE_PARTS = 10_000  # brace alternatives expanded for the overlap check; more fall back to the spec's root


class NotOurs(SourceError):
    """An output folder that stylegen did not make (or whose layout is not stylegen's); the CLI exits 2."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stylegen")
    except PackageNotFoundError:
        return "unknown"


def _entries(fs, root: str, remote: bool) -> list[str] | None:
    """Names directly under ``root``; None when it does not exist."""
    if not remote:
        try:
            return sorted(os.listdir(root))
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            raise NotOurs(f"output.path: {root} is a file, not a folder") from None
    fs.invalidate_cache()
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    except FileNotFoundError:
        return None


def check_layout(url: str) -> None:
    """Refuse layout entries of a local output that are symlinks or of the wrong type (never followed)."""
    if is_remote(url):
        return
    _, root = get_fs(url)
    for name, want in [(n, "directory") for n in LAYOUT_DIRS] + [(n, "file") for n in LAYOUT_FILES]:
        try:
            mode = os.lstat(f"{root}/{name}").st_mode
        except FileNotFoundError:
            continue
        kind = "symlink" if stat.S_ISLNK(mode) else file_kind(mode)
        if kind != want:
            raise NotOurs(f"output.path: {root}/{name} is a {kind}, not a {'regular file' if want == 'file' else want}"
                          f"; refusing to use it (move it away)")


def _is_ours_json(fs, path: str) -> bool:
    try:
        with fs.open(path, "rb") as f:
            record = json.loads(f.read(1 << 20).decode("utf-8"))
    except Exception:
        return False
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        return False
    return "versions" in record and ("operator_hash" in record or record.get("kind") == "filter")


def _is_embeddings_model(fs, path: str) -> bool:
    try:
        with fs.open(path, "rb") as f:
            model = json.loads(f.read(65536).decode("utf-8"))
    except Exception:
        return False
    return isinstance(model, dict) and isinstance(model.get("clip"), list)


def _has_our_index(fs, index_dir: str) -> bool:
    try:
        paths = sorted(p for p in fs.ls(index_dir, detail=False) if p.endswith(".parquet"))
    except (FileNotFoundError, NotADirectoryError):
        return False
    for path in paths[:3]:
        try:
            with fs.open(path, "rb") as f:
                names = set(pq.read_schema(f).names)
        except Exception:
            continue
        if _INDEX_FIELDS <= names:
            return True
    return False


def _legacy(fs, root: str, entries: list[str]) -> bool:
    """An output written by a stylegen version before the marker: its run.json or an index file says so."""
    if "run.json" in entries and _is_ours_json(fs, f"{root}/run.json"):
        return True
    if "_model.json" in entries and _is_embeddings_model(fs, f"{root}/_model.json"):  # an embeddings store
        return True
    return "index" in entries and _has_our_index(fs, f"{root}/index")


def _marker_ok(fs, root: str, remote: bool) -> bool:
    path = f"{root}/{MARKER}"
    if not remote:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(mode):
            raise NotOurs(f"output.path: {path} is a {'symlink' if stat.S_ISLNK(mode) else file_kind(mode)}, "
                          "not stylegen's marker file")
    try:
        with fs.open(path, "rb") as f:
            marker = json.loads(f.read(65536).decode("utf-8"))
    except FileNotFoundError:
        return False
    except Exception:
        marker = None
    if not isinstance(marker, dict) or marker.get("tool") != "stylegen":
        raise NotOurs(f"output.path: {path} is not a stylegen marker; refusing to write into {root}")
    return True


def check_owned(url: str) -> str:
    """Whether stylegen may write ``url``: ``"marked"``, ``"legacy"`` (made by an older stylegen) or ``"new"``
    (missing or empty). Anything else raises :class:`NotOurs` naming the folder and some entries. Reads only."""
    remote = is_remote(url)
    fs, root = get_fs(url)
    root = root.rstrip("/")
    entries = _entries(fs, root, remote)
    if not entries:
        return "new"
    check_layout(url)
    if MARKER in entries and _marker_ok(fs, root, remote):
        return "marked"
    if _legacy(fs, root, entries):
        return "legacy"
    if not remote and set(entries) <= _EMPTY_LAYOUT and all(
            not os.listdir(f"{root}/{e}") for e in entries if os.path.isdir(f"{root}/{e}")):
        return "new"
    shown = ", ".join(entries[:_SHOWN]) + (f", ... ({len(entries)} entries)" if len(entries) > _SHOWN else "")
    raise NotOurs(f"output.path: {url} is not empty and was not made by stylegen (no {MARKER}): it holds {shown}; "
                  "give a new or empty folder")


def claim(url: str, kind: str) -> None:
    """Make ``url`` stylegen's output before anything else is written there: check it (:func:`check_owned`),
    create it if missing and write the marker when it has none. Never touches a folder it refuses."""
    if check_owned(url) == "marked":
        return
    fs, root = get_fs(url)
    root = root.rstrip("/")
    data = json.dumps(marker(kind), indent=2, sort_keys=True).encode()
    if is_remote(url):
        fs.pipe_file(f"{root}/{MARKER}", data)
        return
    os.makedirs(root, exist_ok=True)
    try:
        fd = os.open(f"{root}/{MARKER}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:  # another writer claimed it a moment ago: check what it wrote
        check_owned(url)
        return
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def marker(kind: str) -> dict[str, Any]:
    return {"tool": "stylegen", "version": _version(), "kind": kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ---- sources vs output ----------------------------------------------------------------------------------------
def _norm(url: str) -> tuple[str, str]:
    """``(scheme, normalised path)``: realpath locally, ``bucket/key`` without a trailing slash on S3."""
    if is_remote(url):
        scheme, _, rest = url.partition("://")
        scheme = {"s3a": "s3", "s3n": "s3"}.get(scheme, scheme)
        return scheme, posixpath.normpath("/" + rest).lstrip("/").rstrip("/")
    return "file", os.path.realpath(local_path(url))


def _roots(spec: str) -> list[str]:
    """The brace alternatives of a spec (a very long expansion falls back to the part before its first brace)."""
    parts: list[str] = []
    with contextlib.suppress(Exception):
        for part in braceexpand.braceexpand(spec):
            parts.append(part)
            if len(parts) > _MAX_BRACE_PARTS:
                return [spec.split("{", 1)[0] + "**"]
    return parts or [spec]


def _pattern(part: str) -> tuple[str, list[str], int]:
    """``(scheme, path components, how many of them are literal)`` of one source alternative; a glob keeps its
    pattern components (up to a ``**``, which reaches everything below)."""
    cut = min((i for i in (part.find(ch) for ch in "*?[") if i >= 0), default=len(part))
    if cut == len(part):
        root, rest = part, ""
    else:
        root = part[:cut].rpartition("/")[0]
        rest = part[len(root):]
        root = root or ("/" if part.startswith("/") else ".")
    scheme, path = _norm(root)
    literal = [c for c in path.split("/") if c]
    pattern = [c for c in rest.split("/") if c]
    if "**" in pattern:
        pattern = pattern[:pattern.index("**")]
    return scheme, literal + pattern, len(literal)


def check_overlap(output: str, sources: Iterable[tuple[str, str | None]]) -> None:
    """Refuse sources under ``output`` and an output inside a source root (config error, one line): a source
    overlaps when its path (or glob, component by component) and the output's are one a prefix of the other.
    ``sources`` are ``(config key, spec)`` pairs; None specs are skipped."""
    out_scheme, out_path = _norm(output)
    out_parts = [c for c in out_path.split("/") if c]
    for key, spec in sources:
        if not spec:
            continue
        for part in _roots(spec):
            scheme, parts, literal = _pattern(part)
            pairs = zip(out_parts, parts, strict=False)  # one a prefix of the other, glob components matching
            if scheme != out_scheme or not all(fnmatch.fnmatchcase(o, p) for o, p in pairs):
                continue
            if literal >= len(out_parts):
                raise NotOurs(f"{key}: {spec} is under output.path {output}; a run never reads its own output "
                              "(give a source outside it)")
            raise NotOurs(f"output.path: {output} is inside the source {key}: {spec}; put the output outside "
                          "every source folder")
