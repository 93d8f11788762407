"""``stylegen filter``: CLIP quality filtering of an existing WebDataset corpus (docs/architecture.md §11), one
module per pass. Never imports :mod:`pipeline.generate`.

- :mod:`~pipeline.filter.inputs`: pass 0, list and index the input tars;
- :mod:`~pipeline.filter.embed`: pass 1, the embedding actor;
- :mod:`~pipeline.filter.decide`: pass 2, a decision per sample over the whole pool, with
  :mod:`~pipeline.filter.selection` (basic checks, top fraction) and :mod:`~pipeline.filter.dedup` (exact and
  near-duplicates);
- :mod:`~pipeline.filter.write`: pass 3, what a kept sample's shard holds;
- :mod:`~pipeline.filter.run`: the driver, under the writer leases of the output and the embeddings store.
"""
