"""The Python API of ``stylegen filter`` (docs/architecture.md §6): ``from pipeline.curate import curate``. The code
lives in :mod:`pipeline.filter`."""

from pipeline.filter.run import curate

__all__ = ["curate"]
