"""An offset index of a WebDataset tar: each sample's members with where their bytes are.

Reading a tar's headers needs only seeks (local files and ranged reads on S3), so a corpus is listed without
downloading its images; a member is later fetched with one ranged read. The webdataset library streams
whole tars and keeps no offsets, so this part is hand-written.

Hostile tars are normal input: a sample with an absolute or ``..`` member name, a link member, or a member
cut off by truncation gets an ``error`` (it becomes a `failed` row); a truncated tar keeps the samples before
the damage and says why listing stopped.
"""

from __future__ import annotations

import logging
import re
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

from pipeline.io.fs import open_input
from pipeline.io.members import shown

log = logging.getLogger(__name__)

# WebDataset rule: the key is the path up to the first dot of the last path component.
KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass
class TarSample:
    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (offset, size)
    error: str | None = None


@dataclass
class TarIndex:
    url: str
    samples: list[TarSample]
    truncated: str | None = None  # why listing stopped early, if it did


def unsafe_member(name: str) -> bool:
    """Absolute or climbing (``..``) member names: never used as paths here, but a tar that has them was made
    to attack an extractor, so its samples are refused rather than trusted."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


def _end_is_clean(f: BinaryIO, offset: int) -> bool:
    """True when the archive ends with its end-of-archive zero block at ``offset`` (where tarfile stopped).

    tarfile stops silently at a truncated or garbled header, so a tar cut between two members would look
    complete without this check."""
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


def index_open_tar(f: BinaryIO, url: str, names: list[str] | None = None) -> TarIndex:
    """Index an already opened (seekable) tar file; raises tarfile.ReadError if it is not a tar at all.
    ``names``, when given, receives every member name in archive order (``stylegen verify`` checks them)."""
    samples: dict[str, TarSample] = {}
    truncated = None
    with tarfile.open(fileobj=f, mode="r:") as tar:
        try:
            for info in tar:
                if names is not None:
                    names.append(info.name)
                if info.isdir():
                    continue
                match = KEY_RE.match(info.name)
                if not match:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                sample = samples.setdefault(key, TarSample(key))
                if unsafe_member(info.name):
                    sample.error = sample.error or f"unsafe tar member name {shown(info.name)!r} (absolute or '..')"
                elif not info.isfile():
                    sample.error = sample.error or f"tar member {shown(info.name)!r} is a link, not a file"
                else:
                    sample.members[ext] = (info.offset_data, info.size)
            if not _end_is_clean(f, tar.offset):
                truncated = "no end-of-archive marker"
        except (tarfile.TarError, EOFError, OSError) as exc:
            truncated = str(exc)
    size = f.seek(0, 2)
    for sample in samples.values():
        for ext, (offset, length) in sample.members.items():
            if offset + length > size and sample.error is None:
                sample.error = (f"tar is truncated: member {shown(f'{sample.key}.{ext}')} is cut off "
                                f"({max(0, size - offset)} of {length} bytes)")
    if truncated:
        log.warning("%s is truncated or corrupt after %d samples (%s); later samples are missing",
                    url, len(samples), truncated)
    return TarIndex(url, list(samples.values()), truncated)


def index_tar(url: str) -> TarIndex:
    """Index the tar at ``url``; a local FIFO or device is refused (``NotRegularFileError``), never read."""
    with open_input(url) as f:
        return index_open_tar(f, url)
