"""Where the test data lives: ``tests/data/`` in this repository, nothing outside it.

- ``samples/``: real images (``content/``, ``style/``) and ``prompts.txt``, from the MIT-licensed repository
  xugao97/AttentionDistillation (see ``tests/data/README.md``);
- ``fixtures/ad-reference`` and ``fixtures/ad-reference-flux``: golden outputs of the authors' Attention
  Distillation code, each with its protocol (``cases.json``); how they are compared: ``tests/golden.py``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def samples_dir() -> Path:
    return DATA / "samples"


def fixtures_dir() -> Path:
    return DATA / "fixtures"


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
