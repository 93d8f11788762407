"""The stable import path of docs/architecture.md §1 for Attention Distillation; the code lives in the package
``operators.ad``."""

import operators.ad as ad
from operators.ad import *  # noqa: F401,F403

__all__ = list(ad.__all__)
