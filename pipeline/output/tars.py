"""WebDataset tars as stylegen writes them (docs/architecture.md §5.2): byte-reproducible USTAR archives.

Every member has the same metadata (mode 0444, mtime 0, owner ``stylegen``), so its header is ``tarfile``'s own
header for that metadata with only the name, size and checksum filled in per member. ``tarfile`` builds each
header field by field (~25 us a member, a third of the shard writer's CPU for image-sized members);
``tests/test_store.py`` checks the result against ``tarfile.TarFile.addfile`` byte for byte.

Written with the standard library rather than ``webdataset.TarWriter``: importing webdataset imports torch, which
costs every Ray write worker ~300 MB of memory for twenty lines of tar writing.
"""

from __future__ import annotations

import io
import tarfile

from pipeline.io.members import check_output_member

TAR_MTIME = 0  # fixed member times: the same samples always give the same tar bytes
_SIZE, _CHKSUM = slice(124, 136), slice(148, 156)  # USTAR header fields
_MAX_SIZE = 8 ** 11 - 1  # what the 11 octal digits of a USTAR size hold


def member_info(name: str, size: int) -> tarfile.TarInfo:
    """The metadata of every member stylegen writes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, 0o444
    info.uname = info.gname = "stylegen"
    return info


_TEMPLATE = member_info("", 0).tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
# The checksum is the sum of the header's bytes with its own field read as spaces: the template's part of it.
_TEMPLATE_SUM = sum(_TEMPLATE) - sum(_TEMPLATE[_CHKSUM]) + 8 * ord(" ") - sum(_TEMPLATE[_SIZE])


def member_header(name: str, size: int) -> bytes:
    """The USTAR header ``tarfile`` writes for :func:`member_info` ``(name, size)`` (an ASCII name of at most
    100 characters: an output member name always is one)."""
    raw = name.encode("ascii")
    if len(raw) > 100 or size > _MAX_SIZE:
        return member_info(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")  # tarfile raises
    size_field = b"%011o\0" % size
    header = bytearray(_TEMPLATE)
    header[: len(raw)] = raw  # the template's name is all NULs
    header[_SIZE] = size_field
    header[_CHKSUM] = b"%06o\0 " % (_TEMPLATE_SUM + sum(raw) + sum(size_field))
    return bytes(header)


def write_tar(fileobj: io.IOBase, samples: list[dict[str, bytes | str]]) -> None:
    """WebDataset tar (members ``KEY.EXT``) with samples sorted by key and members by extension, fixed metadata.

    Every name is ``<16 hex>.<portable ext>`` (``pipeline.io.members``): any other refuses the whole write with a
    ValueError rather than put a foreign or unsafe name into an output. Members of one key are contiguous.
    """
    write = fileobj.write
    offset = 0
    for sample in sorted(samples, key=lambda s: s["__key__"]):
        key = sample["__key__"]
        for ext in sorted(k for k in sample if k != "__key__"):
            check_output_member(key, ext)
            data = sample[ext]
            data = data.encode("utf-8") if isinstance(data, str) else data
            size = len(data)
            write(member_header(f"{key}.{ext}", size))
            write(data)
            pad = -size % tarfile.BLOCKSIZE
            if pad:
                write(b"\0" * pad)
            offset += tarfile.BLOCKSIZE + size + pad
    end = offset + 2 * tarfile.BLOCKSIZE  # two zero blocks, then zeros up to a whole record, as tarfile.close()
    write(b"\0" * (end - offset + -end % tarfile.RECORDSIZE))
