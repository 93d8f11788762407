"""Reading a finished output, which may have come from anywhere: every value is data, never markup or a path to
follow (docs/architecture.md §14).

- :mod:`~pipeline.review.untrusted`: the guards (escaped text, checked shard names, capped decoding);
- :mod:`~pipeline.review.report`: ``stylegen report``, one offline HTML page;
- :mod:`~pipeline.review.reproduce`: ``stylegen reproduce``, one kept sample made again and compared.
"""
