"""The output invariants of docs/architecture.md §5, checked the way a user would read the data back."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq

from pipeline.output.store import OutputStore


def read_index(output: str) -> list[dict]:
    store = OutputStore(output)
    rows = []
    for path in store.index_files():
        with store.fs.open(path, "rb") as f:
            rows.extend(pq.read_table(f).to_pylist())
    return rows


def tar_keys(output: str) -> dict[str, list[str]]:
    """Shard name -> sample keys, read with the standard library's tarfile."""
    store = OutputStore(output)
    out = {}
    for path in store.shard_files():
        with store.fs.open(path, "rb") as f:
            data = f.read()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = tar.getnames()
        assert all("/" not in n and not n.startswith(".") for n in names), names
        out[path.rsplit("/", 1)[-1]] = sorted({n.split(".", 1)[0] for n in names})
    return out


def check_invariants(output: str, planned_keys: set[str]) -> list[dict]:
    """Every planned key has exactly one index row; shard keys are exactly the kept keys; no temp files."""
    rows = read_index(output)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "a key appears in more than one index row"
    assert set(keys) == planned_keys, (set(keys) ^ planned_keys)
    assert {r["status"] for r in rows} <= {"kept", "rejected", "failed"}
    for r in rows:
        if r["status"] == "kept":
            assert r["shard"], r
        else:
            assert r["reason"], r
    kept = {r["key"] for r in rows if r["status"] == "kept"}
    shards = tar_keys(output)
    in_tars = [k for ks in shards.values() for k in ks]
    assert len(in_tars) == len(set(in_tars)), "a key appears in two shards"
    assert set(in_tars) == kept
    for r in rows:
        if r["status"] == "kept":
            assert r["key"] in shards[r["shard"]]
            assert isinstance(json.loads(r["meta"]), dict)
    store = OutputStore(output)
    if not store.remote:
        import os

        assert not os.listdir(store.tmp), "temporary files left behind"
    return rows
