"""The cause chain every error decision walks: Ray's ``.cause``, then Python's own chaining, each link once."""

from __future__ import annotations

from pipeline.errors import exception_chain


class RayStyle(Exception):
    """As Ray wraps a task's exception: the original kept as ``.cause``, not chained by ``raise ... from``."""

    def __init__(self, cause: BaseException):
        super().__init__("task failed")
        self.cause = cause


def test_the_chain_follows_ray_cause_then_python_chaining_and_stops_at_a_loop():
    root = OSError(28, "No space left on device", "/out/shard.tar")
    try:
        try:
            raise root
        except OSError as exc:
            raise RuntimeError("writing failed") from exc
    except RuntimeError as exc:
        middle = exc
    outer = RayStyle(middle)
    assert list(exception_chain(outer)) == [outer, middle, root]
    root.__context__ = outer  # a loop: each link once, then the walk ends
    assert list(exception_chain(outer)) == [outer, middle, root]
    assert list(exception_chain(None)) == []
