"""Pass 3 of ``stylegen filter``: what a kept sample's shard holds. Its screened image and text members are copied
byte for byte (never re-encoded) under stylegen's own key; foreign names never reach the writer
(``pipeline.io.members``)."""

from __future__ import annotations

import json
from typing import Any

from pipeline.config import OutputConfig
from pipeline.io.fs import read_range
from pipeline.io.members import kept_members


def copy_members(row: dict[str, Any], out: OutputConfig) -> dict[str, bytes | str]:
    """A kept sample's screened image and its text members (``pipeline.io.members.kept_members``), byte for byte,
    under its output key; the sample's own names (``__key__``, other members) are never written."""
    members = json.loads(row["members"])
    sample: dict[str, bytes | str] = {ext: read_range(row["url"], *members[ext]) for ext in kept_members(members)[0]}
    sample["__key__"] = row["key"]
    return sample
