"""What stylegen writes, and only what stylegen owns (docs/architecture.md §5).

- :mod:`~pipeline.output.ownership`: the ``.stylegen`` marker, and the refusals of folders stylegen did not make;
- :mod:`~pipeline.output.store`: the output folder and its commit protocol (tar first, index last);
- :mod:`~pipeline.output.tars`: the tar writer (byte-reproducible USTAR, tarfile's bytes);
- :mod:`~pipeline.output.publish`: the store's publications, in order, on a background thread;
- :mod:`~pipeline.output.sink`: the Ray Data sinks that commit through the store;
- :mod:`~pipeline.output.lease`: one writer per output;
- :mod:`~pipeline.output.resume`: which planned samples are done (a join on the cluster);
- :mod:`~pipeline.output.integrity`: damage found, quarantined (never deleted), and the start-up of a writer;
- :mod:`~pipeline.output.record`: a run's summary and ``run.json``, for ``run`` and ``filter`` alike;
- :mod:`~pipeline.output.card`: the dataset card ``README.md``;
- :mod:`~pipeline.output.progress`: one progress line every few seconds, from the committed index.
"""
