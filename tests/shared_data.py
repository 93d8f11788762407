"""Where the shared material (`shared/data/samples`, `shared/fixtures`) lives.

CI has it at ``../shared`` beside the checkout. A fresh clone made elsewhere (``git clone . $(mktemp -d)``)
finds it beside the repository it was cloned from; ``STYLEGEN_SHARED`` overrides both.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _origin_dir() -> Path | None:
    try:
        url = subprocess.run(["git", "-C", str(REPO), "config", "--get", "remote.origin.url"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    url = url.removeprefix("file://")
    return Path(url) if url and os.path.isdir(url) else None


@lru_cache(maxsize=1)
def shared_root() -> Path:
    candidates = [os.environ.get("STYLEGEN_SHARED"), REPO.parent / "shared"]
    origin = _origin_dir()
    if origin is not None:
        candidates.append(origin.resolve().parent / "shared")
    for candidate in candidates:
        if candidate and (Path(candidate) / "data" / "samples").is_dir():
            return Path(candidate).resolve()
    raise FileNotFoundError("shared material not found: set STYLEGEN_SHARED or keep ../shared beside the repo")


def samples_dir() -> Path:
    return shared_root() / "data" / "samples"


def fixtures_dir() -> Path:
    return shared_root() / "fixtures"


@contextlib.contextmanager
def fixture_protocol():
    """The golden fixtures' protocol while the block runs: one thread, deterministic algorithms (other thread
    counts change the float noise, which Adam's sign-like first step amplifies)."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
