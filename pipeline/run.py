"""The Python API of ``stylegen run`` (docs/architecture.md §6): ``from pipeline.run import run``. The code lives in
:mod:`pipeline.generate.run`."""

from pipeline.generate.run import PlanSummary, plan_only, run
from pipeline.output.record import RunSummary

__all__ = ["PlanSummary", "RunSummary", "plan_only", "run"]
