"""Source readers: list content and style items as metadata; bytes are fetched later, per sample.

Supported specs (local or any fsspec URL such as ``s3://``):
- a folder (recursive) or a glob of image files;
- WebDataset tars: ``x.tar``, ``shard-{000..009}.tar`` (brace expansion) or a glob of tars;
- manifests: ``.parquet`` / ``.jsonl`` with an image column (``image|path|url|file``, relative to the
  manifest) and/or a prompt column (``prompt|caption|text``), optional ``id``;
- prompt lists: ``.txt`` (one prompt per non-blank line), or a manifest with only prompts.

Hostile input is normal input: prompts lose C0/C1 control characters (newline and tab stay) and surrounding
whitespace; a prompt-only row whose prompt ends up empty, a manifest row without an image in an image source,
a tar sample without an image member, with an unsafe member name (absolute or ``..``), a link member or a
member cut off by truncation all become items with an ``error``, so each is a `failed` row, never lost.

Tar members are indexed by offset (``pipeline.io.tar_index``) so that a sample's image is later read with one
ranged read.

Local folder and glob listings keep regular files only (a FIFO named ``x.png`` would hang the reader; a device
would never end), follow a symlink only when its target stays inside the folder or glob root, and can exclude
folders (the run's own output, so a rerun never takes its shards or report images as inputs). Each skipped file
is named in one warning; an explicitly named input that is not a regular file is a SourceError.

Sources reach only what the user named (``sources`` in the config, :class:`pipeline.config.SourcesConfig`):
- every source spec must use an allowed protocol (``sources.protocols``, default local files and ``s3``); a
  chained URL (``a::b``) or ``memory://`` never: a SourceError at listing, before any request;
- a manifest entry resolves only inside the manifest's own root (the folder or bucket/prefix holding the
  manifest) or a ``sources.roots`` entry. An absolute path, a ``..`` escape, a symlink out, another bucket, a
  refused protocol: that row is an item with an ``error`` (a `failed` row), and nothing of it is ever read;
- prompt lists and manifests are capped in bytes (``sources.max_prompt_bytes``, ``max_manifest_bytes``, checked
  from the size before reading) and prompt lists in lines (``sources.max_prompt_lines``): a SourceError above.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import stat
import tarfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

import braceexpand
import pyarrow.parquet as pq

from pipeline.config import SourcesConfig
from pipeline.io.captions import PROMPT_COLUMNS, prompt_value
from pipeline.io.fs import (
    InputTooLargeError,
    RefusedInputError,
    check_protocol,
    file_kind,
    full_url,
    get_fs,
    is_remote,
    local_path,
    open_input,
    read_range,
    url_protocol,
)
from pipeline.io.members import IMAGE_EXTS, screened_image
from pipeline.io.tar_index import index_open_tar

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "path", "url", "file")
TAR_EXTS = (".tar",)
MANIFEST_EXTS = (".parquet", ".jsonl")
# Default for the listing functions' ``follow_symlinks``: False follows a link only when its target stays inside
# the listed root, so a corpus cannot pull in files from elsewhere on the machine (a home folder, /etc).
FOLLOW_SYMLINKS = False


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


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _LocalListing:
    """Which listed local files may become inputs: regular files, inside ``root`` (resolved), not under an
    ``exclude`` folder. Skips are logged: one warning per odd file, one count for the excluded folders."""

    def __init__(self, key: str, root: str, exclude: Sequence[str] = (), follow_symlinks: bool = FOLLOW_SYMLINKS):
        self.key = key
        self.root = os.path.realpath(root)
        self.exclude = [os.path.realpath(e) for e in exclude]
        self.follow_symlinks = follow_symlinks
        self.excluded = 0
        self._real_dir = functools.lru_cache(maxsize=4096)(os.path.realpath)

    def _realpath(self, path: str) -> str:
        if os.path.islink(path):
            return os.path.realpath(path)
        head, tail = os.path.split(path)  # one realpath per folder, not per file: listings can be huge
        return os.path.join(self._real_dir(head), tail)

    def keep(self, path: str) -> bool:
        try:
            mode = os.stat(path).st_mode  # follows symlinks: a link counts as what it points to
        except OSError as exc:
            log.warning("%s: skipping %s: cannot stat it (%s)", self.key, path, exc.strerror or exc)
            return False
        if stat.S_ISDIR(mode):  # a glob matching folders: containers, not inputs
            return False
        if not stat.S_ISREG(mode):
            log.warning("%s: skipping %s: not a regular file (%s)", self.key, path, file_kind(mode))
            return False
        real = self._realpath(path)
        if any(_under(real, folder) for folder in self.exclude):
            self.excluded += 1
            return False
        if not self.follow_symlinks and not _under(real, self.root):
            log.warning("%s: skipping %s: it resolves to %s, outside %s", self.key, path, real, self.root)
            return False
        return True

    def report(self) -> None:
        if self.excluded:
            log.warning("%s: skipped %d file(s) under the output folder %s (a run's output is never its input)",
                        self.key, self.excluded, ", ".join(self.exclude))


def _check_regular(url: str, key: str) -> None:
    """An explicitly named local input must be a regular file (or a folder): refuse a FIFO before it blocks."""
    if is_remote(url):
        return
    try:
        mode = os.stat(url).st_mode
    except OSError:
        return  # missing or unreadable: reported by whoever reads it, with the usual message
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise SourceError(f"{key}: not a regular file ({file_kind(mode)}): {url}")


def check_spec(spec: str, key: str, policy: SourcesConfig | None = None) -> None:
    """A source spec the config names must use an allowed protocol: a SourceError (exit 2), nothing requested."""
    try:
        check_protocol(spec, (policy or DEFAULT_POLICY).protocols)
    except RefusedInputError as exc:
        raise SourceError(f"{key}: {exc}") from None


def output_exclusion(output: str) -> list[str]:
    """What a listing must skip for an output at ``output``: the output folder itself when it is local (its own
    shards must never become its input), nothing when remote (a local listing never reaches it)."""
    return [] if is_remote(output) else [local_path(output)]


def expand(spec: str, key: str = "source", *, exclude: Sequence[str] = (),
            follow_symlinks: bool = FOLLOW_SYMLINKS, policy: SourcesConfig | None = None) -> list[str]:
    """Brace-expand then glob a spec into concrete URLs (sorted, de-duplicated). Local glob matches go through
    :class:`_LocalListing`; a named local file that is not regular is a SourceError; a refused protocol
    (:func:`check_spec`) is a SourceError before any part is listed."""
    check_spec(spec, key, policy)
    urls: list[str] = []
    listing = None
    if not is_remote(spec):
        listing = _LocalListing(key, id_root(get_fs(spec)[1]), exclude, follow_symlinks)
    for part in braceexpand.braceexpand(spec):
        check_spec(part, key, policy)  # a brace may hide another protocol: {s3://a,http://b}
        fs, path = get_fs(part)
        if _is_glob(path):
            urls.extend(full_url(fs, p) for p in sorted(fs.glob(path)) if listing is None or listing.keep(p))
        else:
            url = part if is_remote(part) else full_url(fs, path)
            _check_regular(url, key)
            urls.append(url)
    if listing is not None:
        listing.report()
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


def check_output(url: str, key: str = "output.path") -> None:
    """Fail fast, with one line naming the location, when the output cannot be written. Locally nothing is
    created: the path (or its nearest existing parent) must be a writable folder. On S3 a probe object is
    written and deleted inside ``url`` (the only way to learn that a bucket takes writes)."""
    try:
        if is_remote(url):
            fs, path = get_fs(url)
            probe = f"{path.rstrip('/')}/_tmp_probe_{uuid.uuid4().hex}"
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
            return
        path = local_path(url)
        existing = path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise NotADirectoryError(f"{existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(existing)
    except PermissionError:
        raise SourceError(f"{key}: access denied, cannot write to {url}") from None
    except Exception as exc:  # a file in the way, a missing bucket, an unreachable endpoint
        raise SourceError(f"{key}: cannot write to {url} ({exc.__class__.__name__}: {exc})") from None


def _unreadable(key: str, spec: str, exc: Exception) -> SourceError:
    if isinstance(exc, PermissionError):
        return SourceError(f"{key}: access denied to {spec}")
    return SourceError(f"{key}: cannot read {spec} ({exc.__class__.__name__}: {exc})")


def _named_errors(read: Callable[[str, str], list[SourceItem]]) -> Callable[..., list[SourceItem]]:
    """Any failure while listing a source (network, permissions, a file that vanished) becomes a SourceError
    naming the config key, so the CLI can print one line and exit 2."""

    @functools.wraps(read)
    def wrapper(spec: str, key: str, **options) -> list[SourceItem]:
        try:
            return read(spec, key, **options)
        except SourceError:
            raise
        except Exception as exc:
            raise _unreadable(key, spec, exc) from None

    return wrapper


def read_prompts(spec: str, key: str = "content.prompts", *, exclude: Sequence[str] = (),
                 follow_symlinks: bool = FOLLOW_SYMLINKS, policy: SourcesConfig | None = None) -> list[SourceItem]:
    """Read a prompt list (``.txt``, ``.jsonl``, ``.parquet``); any failure is a SourceError naming the key.
    Glob matches under an ``exclude`` folder are skipped (the run's output holds parquet with prompts)."""
    return _read_prompts(spec, key, exclude=exclude, follow_symlinks=follow_symlinks, policy=policy)


@_named_errors
def _read_prompts(spec: str, key: str, *, exclude: Sequence[str] = (),
                  follow_symlinks: bool = FOLLOW_SYMLINKS, policy: SourcesConfig | None = None) -> list[SourceItem]:
    items = [i for unit in list_prompt_units(spec, key, exclude=exclude, follow_symlinks=follow_symlinks,
                                             policy=policy)
             for i in read_unit(unit)]
    if not items:
        raise SourceError(f"{key}: no prompts in {spec}")
    return items


@_named_errors
def list_prompt_units(spec: str, key: str = "content.prompts", *, exclude: Sequence[str] = (),
                      follow_symlinks: bool = FOLLOW_SYMLINKS, policy: SourcesConfig | None = None) -> list[SourceUnit]:
    """The files of a prompt source, each to be read by :func:`read_unit` (in the driver or on a worker)."""
    urls = expand(spec, key, exclude=exclude, follow_symlinks=follow_symlinks, policy=policy)
    if not urls:
        raise SourceError(f"{key}: no files match {spec}")
    root = id_root(get_fs(spec)[1])
    units = []
    for url in urls:
        _check_exists(url, key)
        kind = "prompt-manifest" if url.endswith(MANIFEST_EXTS) else "prompts"
        units.append(SourceUnit(kind, url, relative_id(url, root), key, _policy_json(policy)))
    return units


def _read_capped(url: str, key: str, max_bytes: int, cap_key: str) -> bytes:
    """A whole prompt list or manifest, refused (SourceError) from its size when above its cap."""
    try:
        return read_range(url, max_bytes=max_bytes, cap_key=cap_key)
    except InputTooLargeError as exc:
        raise SourceError(f"{key}: {exc}") from None


def _too_many_lines(key: str, url: str, policy: SourcesConfig) -> SourceError:
    return SourceError(f"{key}: {url} has more than sources.max_prompt_lines={policy.max_prompt_lines} lines")


def _read_prompt_lines(url: str, key: str, base: str, policy: SourcesConfig | None = None) -> list[SourceItem]:
    policy = policy or DEFAULT_POLICY
    try:
        text = _read_capped(url, key, policy.max_prompt_bytes, "sources.max_prompt_bytes").decode("utf-8")
    except UnicodeDecodeError:
        raise SourceError(f"{key}: {url} is not UTF-8 text") from None
    if text.count("\n") + (not text.endswith("\n")) > policy.max_prompt_lines:
        raise _too_many_lines(key, url, policy)
    items = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: \x1c-\x1e, \x85 are no breaks
        prompt, error = prompt_value(line)
        if prompt or error:  # blank (or control-only) lines are skipped by design
            items.append(SourceItem(id=f"{base}:{lineno}", prompt=prompt, error=error))
    return items


@_named_errors
def read_images(spec: str, key: str, *, exclude: Sequence[str] = (),
                follow_symlinks: bool = FOLLOW_SYMLINKS, policy: SourcesConfig | None = None) -> list[SourceItem]:
    """Read an image source of any supported kind into items (no pixels are read); any failure is a
    SourceError naming the key. Folder and glob listings skip files under an ``exclude`` folder (local)."""
    items = [i for unit in list_image_units(spec, key, exclude=exclude, follow_symlinks=follow_symlinks,
                                            policy=policy)
             for i in read_unit(unit)]
    if not items:
        raise SourceError(f"{key}: no images in {spec}")
    return dedupe(items)


@_named_errors
def list_image_units(spec: str, key: str, *, exclude: Sequence[str] = (),
                     follow_symlinks: bool = FOLLOW_SYMLINKS, policy: SourcesConfig | None = None) -> list[SourceUnit]:
    """The files of an image source (paths only, nothing read), each to be read by :func:`read_unit`."""
    check_spec(spec, key, policy)
    fs, path = get_fs(spec)
    if not _is_glob(path) and "{" not in spec:
        _check_exists(spec, key)
        if fs.isdir(path):
            listing = None if is_remote(spec) else _LocalListing(key, path, exclude, follow_symlinks)
            return _list_folder(fs, path, key, listing)
    urls = expand(spec, key, exclude=exclude, follow_symlinks=follow_symlinks, policy=policy)
    if not urls:
        raise SourceError(f"{key}: no files match {spec}")
    root = id_root(path)
    units = []
    for url in urls:
        if url.endswith(TAR_EXTS):
            kind = "tar"
        elif url.endswith(MANIFEST_EXTS):
            kind = "image-manifest"
        elif _ext(url) in IMAGE_EXTS:
            kind = "image"
        else:
            raise SourceError(f"{key}: unsupported source file {url} (expected images, .tar, .parquet, .jsonl)")
        units.append(SourceUnit(kind, url, relative_id(url, root), key, _policy_json(policy)))
    return units


@dataclass(frozen=True)
class SourceUnit:
    """One listed file of a source and how to read it: the unit of parallel listing (one Ray task per tar or
    manifest). ``base`` is the item id (an image) or the id prefix (a tar, a prompt list)."""

    kind: str  # image | tar | image-manifest | prompt-manifest | prompts
    url: str
    base: str
    key: str  # the config key, for error messages
    policy: str = ""  # the run's ``sources`` config as JSON ("" = defaults): plain data, so it travels through Ray

    @property
    def sources(self) -> SourcesConfig:
        return _policy(self.policy)

    @property
    def may_repeat_ids(self) -> bool:
        """Only manifests name their own ids; every other kind derives unique ids from its path."""
        return self.kind.endswith("manifest")


def read_unit(unit: SourceUnit) -> list[SourceItem]:
    """The items of one unit, in file order (a unit's own repeated ids are kept; callers drop repeats)."""
    try:
        if unit.kind == "image":
            return [SourceItem(id=unit.base, image=ImageRef(unit.url))]
        if unit.kind == "tar":
            return _read_tar(unit.url, unit.key, unit.base)
        if unit.kind == "image-manifest":
            return [i if i.image is not None or i.error else
                    SourceItem(id=i.id, prompt=i.prompt, error="manifest row has no image")
                    for i in _read_manifest(unit.url, unit.key, unit.sources)]
        if unit.kind == "prompt-manifest":
            items = [i for i in _read_manifest(unit.url, unit.key, unit.sources) if i.prompt is not None or i.error]
            if len(items) > unit.sources.max_prompt_lines:
                raise _too_many_lines(unit.key, unit.url, unit.sources)
            return items
        return _read_prompt_lines(unit.url, unit.key, unit.base, unit.sources)
    except SourceError:
        raise
    except Exception as exc:
        raise _unreadable(unit.key, unit.url, exc) from None


DEFAULT_POLICY = SourcesConfig()


def _policy_json(policy: SourcesConfig | None) -> str:
    return "" if policy is None or policy == DEFAULT_POLICY else policy.model_dump_json()


@functools.lru_cache(maxsize=8)
def _policy(text: str) -> SourcesConfig:
    return SourcesConfig.model_validate_json(text) if text else DEFAULT_POLICY


def id_root(path: str) -> str:
    """The folder that ids are relative to: everything before the first brace or glob character's
    path component, so two matches never share an id and no id climbs out with ``..``."""
    cut = min((i for i in (path.find(ch) for ch in "{*?[") if i >= 0), default=len(path))
    return posixpath.dirname(path[:cut]) if cut < len(path) else posixpath.dirname(path)


def relative_id(url: str, root: str) -> str:
    _, path = get_fs(url)
    return posixpath.relpath(path, root) if root else posixpath.basename(path)


def _list_folder(fs, path: str, key: str, listing: _LocalListing | None = None) -> list[SourceUnit]:
    files = sorted(p for p in fs.find(path) if _ext(p) in IMAGE_EXTS and (listing is None or listing.keep(p)))
    if listing is not None:
        listing.report()
    if not files:
        raise SourceError(f"{key}: no images in folder {path}")
    return [SourceUnit("image", full_url(fs, p), posixpath.relpath(p, path), key) for p in files]


def dedupe(items: list[SourceItem]) -> list[SourceItem]:
    seen: set[str] = set()
    out = []
    for item in items:
        if item.id in seen:
            log.warning("duplicate source id %r: keeping the first occurrence", item.id)
            continue
        seen.add(item.id)
        out.append(item)
    return out


def _read_tar(url: str, key: str, base: str) -> list[SourceItem]:
    """Index a WebDataset tar (``pipeline.io.tar_index``): image member offsets plus captions (txt/json), read
    with seeks only. Sample ids are ``<base>/<sample key>``; samples that cannot be used get an ``error``."""
    try:
        with open_input(url) as f:
            index = index_open_tar(f, url)
            captions = {s.key: _tar_caption(f, s.members, url, s.key) for s in index.samples if not s.error}
    except tarfile.ReadError as exc:
        raise SourceError(f"{key}: {url} is not a readable tar ({exc})") from None
    items = []
    for sample in index.samples:
        image_ext = screened_image(sample.members)
        error = sample.error
        if error is None and image_ext is None:
            error = f"tar sample has no image member (has: {', '.join(sorted(sample.members))})"
        ref = None if error else ImageRef(url, *sample.members[image_ext])
        items.append(SourceItem(id=f"{base}/{sample.key}", image=ref, prompt=captions.get(sample.key), error=error))
    return items


def _tar_caption(f, members: dict[str, tuple[int, int]], url: str = "", sample_key: str = "") -> str | None:
    """The sample's caption from the open tar ``f``, by the reader ``filter`` uses too (``pipeline.io.captions``)."""
    from pipeline.io.captions import read_caption

    def read(offset: int, size: int) -> bytes:
        f.seek(offset)
        return f.read(size)

    return read_caption(read, members, url, sample_key)


def _read_manifest(url: str, key: str, policy: SourcesConfig | None = None) -> list[SourceItem]:
    policy = policy or DEFAULT_POLICY
    fs, path = get_fs(url)
    cap = policy.max_manifest_bytes
    try:
        if url.endswith(".parquet"):
            with open_input(url, max_bytes=cap, cap_key="sources.max_manifest_bytes") as f:
                rows = pq.read_table(f).to_pylist()
        else:
            rows = []
            text = _read_capped(url, key, cap, "sources.max_manifest_bytes").decode("utf-8")
            # split on \n only: U+2028 or \x85 inside a JSON string are legal and must not end the line
            for lineno, line in enumerate(text.split("\n"), start=1):
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
    except InputTooLargeError as exc:
        raise SourceError(f"{key}: {exc}") from None
    except Exception as exc:
        raise SourceError(f"{key}: cannot read manifest {url} ({exc.__class__.__name__})") from None
    base_dir = posixpath.dirname(path)
    base = posixpath.basename(path)
    scope = _ManifestScope(url, base_dir, policy)
    items = []
    for index, row in enumerate(rows):
        image_col = next((c for c in IMAGE_COLUMNS if isinstance(row.get(c), str) and row[c]), None)
        prompt_col = next((c for c in PROMPT_COLUMNS if c in row and row[c] is not None), None)
        ref = refused = None
        if image_col:
            target = row[image_col]
            if "://" not in target and "::" not in target:  # a path on the manifest's own file system
                target = full_url(fs, posixpath.join(base_dir, target))  # (joining an absolute path keeps it)
            refused = scope.refusal(target)
            ref = None if refused else ImageRef(target)
        prompt, error = prompt_value(row[prompt_col]) if prompt_col else (None, None)
        error = refused or error
        if ref is None and prompt is None and error is None:
            error = "empty prompt" if prompt_col else "row has no prompt and no image"
        raw_id = row.get("id")
        if raw_id is None or raw_id == "":
            raw_id = row[image_col] if image_col else f"{base}:{index + 1}"
        items.append(SourceItem(id=str(raw_id), image=ref, prompt=prompt, error=error))
    return items


class _ManifestScope:
    """Where the entries of one manifest may point: inside the manifest's own root (the folder or bucket/prefix
    holding it) or a ``sources.roots`` entry, through an allowed protocol.

    Containment is judged on normalised locations: ``..`` is resolved, and a local entry by its real path (so a
    symlink out of the root is outside it). A URL with ``::`` is never allowed. Nothing is opened here."""

    def __init__(self, manifest_url: str, base_dir: str, policy: SourcesConfig):
        self.protocols = policy.protocols
        manifest_root = base_dir if not is_remote(manifest_url) else f"{url_protocol(manifest_url)}://{base_dir}"
        self._real_dir = functools.lru_cache(maxsize=4096)(os.path.realpath)
        self.roots = [self._location(r) for r in (manifest_root, *policy.roots)]

    def _location(self, url: str) -> tuple[str, str]:
        """``(protocol, normalised path)``; a local path resolved to its real path."""
        protocol = url_protocol(url)
        if protocol == "file":
            path = local_path(os.path.expanduser(url))
            head, tail = os.path.split(os.path.normpath(path))
            if os.path.islink(path) or tail in ("", ".", ".."):
                return protocol, os.path.realpath(path)
            return protocol, os.path.join(self._real_dir(head), tail)  # one realpath per folder, not per row
        # percent-decoded first: a server may read %2e%2e as ..
        return protocol, posixpath.normpath("/" + unquote(url.split("://", 1)[1])).lstrip("/")

    def refusal(self, url: str) -> str | None:
        """Why the entry ``url`` may not be read (None when it may)."""
        try:
            check_protocol(url, self.protocols)
        except RefusedInputError as exc:
            return f"manifest entry refused: {exc}"
        protocol, path = self._location(url)
        for root_protocol, root in self.roots:
            if protocol == root_protocol and (path == root or path.startswith(root.rstrip("/") + "/")):
                return None
        return (f"manifest entry refused: {url} is outside the manifest's folder (an entry may only point inside "
                "it, or inside a sources.roots entry)")


def read_content(prompts: str | None, images: str | None, *, exclude: Sequence[str] = (),
                 follow_symlinks: bool = FOLLOW_SYMLINKS, policy: SourcesConfig | None = None) -> list[SourceItem]:
    """Content items. With both prompts and images, image i takes its own caption if it has one,
    else prompt ``i mod len(prompts)``."""
    options = {"exclude": exclude, "follow_symlinks": follow_symlinks, "policy": policy}
    prompt_items = read_prompts(prompts, **options) if prompts else []
    if not images:
        return dedupe(prompt_items)
    image_items = read_images(images, "content.images", **options)
    pool = [p.prompt for p in prompt_items if p.prompt]
    if not pool:
        return image_items
    out = []
    for index, item in enumerate(image_items):
        prompt = item.prompt if item.prompt else pool[index % len(pool)]
        out.append(SourceItem(id=item.id, image=item.image, prompt=prompt, error=item.error))
    return out

