"""Reading what users name: nothing here writes, and everything treats its input as hostile (docs/architecture.md
§3, README "Security").

- :mod:`~pipeline.io.fs`: URLs to file systems (local, S3), the protocol allow-list, capped and retried reads, and
  the tell between a store that failed a read and bytes that do not parse;
- :mod:`~pipeline.io.images`: decoding under pixel and aspect limits, encoding outputs;
- :mod:`~pipeline.io.members`: WebDataset member names (which one is the image, which are kept, which are unsafe);
- :mod:`~pipeline.io.tar_index`: a tar's sample offsets from its headers (ranged reads, no image bytes);
- :mod:`~pipeline.io.captions`: the one caption and prompt reader of ``run`` and ``filter``;
- :mod:`~pipeline.io.sources`: listing and reading content, style and prompt sources (folders, globs, tars,
  manifests, prompt lists).
"""
