"""What a run will make (docs/architecture.md §2).

- :mod:`~pipeline.plan.keys`: sample keys and the pairing of content with styles and seeds, in the driver; the
  reference the Ray plan must equal row for row;
- :mod:`~pipeline.plan.dataset`: the same plan as a Ray Dataset, read and paired on the cluster.
"""
