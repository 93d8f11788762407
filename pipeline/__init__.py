"""The data path of stylegen: everything between a config and a finished output (docs/architecture.md).

Layers, each importing only from the layers above it in this list (``tests/test_layers.py`` holds it):

- bottom, no stylegen imports of their own beyond each other:
  :mod:`~pipeline.config` (every YAML schema: ``RunConfig`` for ``run``, ``FilterRunConfig`` for ``filter``),
  :mod:`~pipeline.schema` (the Arrow schemas and status names), :mod:`~pipeline.redact` (secrets out of every
  line), :mod:`~pipeline.score_rules` (the head-score rule both commands apply), :mod:`~pipeline.errors` (an
  exception's cause chain, as Ray wraps it);
- :mod:`pipeline.io`: reading what users name (URLs and file systems, images, tar offsets, member names,
  captions, sources);
- :mod:`pipeline.output`: what stylegen writes and owns (the store and its commit protocol, the Ray sinks, the
  writer lease, ownership, integrity and repair, resume, ``run.json``, the dataset card, progress);
- :mod:`~pipeline.session`: the Ray session of a command (start or connect, Ray Data settings, a step whose
  source errors come back as one line, GPU requests and devices) and :mod:`~pipeline.stall` (a run that stops
  progressing ends with one line naming what the cluster lacks);
- :mod:`pipeline.plan`: the sample keys and pairing (:mod:`~pipeline.plan.keys`) and the plan as a Ray Dataset
  (:mod:`~pipeline.plan.dataset`);
- :mod:`pipeline.generate` (``stylegen run`` and ``plan``) and :mod:`pipeline.filter` (``stylegen filter``),
  side by side: neither imports the other;
- :mod:`pipeline.review`: reading a finished output (``report``, ``reproduce``) as untrusted data;
- the Python API on top (docs/architecture.md §6): :mod:`pipeline.run` (``run``) and :mod:`pipeline.curate`
  (``curate``), thin names for :mod:`pipeline.generate.run` and :mod:`pipeline.filter.run`.

A test of a module lives in ``tests/`` under the module's name (``tests/test_<module>.py``, e.g.
``tests/test_store.py`` for :mod:`pipeline.output.store`); the map of test files is ``tests/README.md``.
"""

from pipeline.redact import install_log_redaction

# Every process that runs stylegen code (the driver, each Ray worker, a submitted job) imports this package first:
# from then on no log line it writes carries a URL credential or a secret env var value.
install_log_redaction()
