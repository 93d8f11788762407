"""``stylegen run`` and ``stylegen plan`` (docs/architecture.md §2). Never imports :mod:`pipeline.filter`.

- :mod:`~pipeline.generate.stages`: the Ray Data stages (decode tasks, stylize and score actors, the thresholds);
- :mod:`~pipeline.generate.run`: the driver: plan, skip done work, stream the stages into the sink, record.
"""
