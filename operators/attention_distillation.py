"""The stable import path of docs/architecture.md §1 for Attention Distillation; the code lives in the package
``operators.ad``."""

from operators.ad import *  # noqa: F401,F403
from operators.ad import __all__  # noqa: F401
