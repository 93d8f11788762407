"""Walking an exception's cause chain. Ray hands a task's exception back wrapped (the original kept as ``.cause``,
and as ``__cause__``/``__context__`` by Python's own chaining); what stylegen decides from an error (a source
error, an OSError's path, an out-of-memory, a stall, a refused conditional write) is read from the link that
carries it, wherever it sits."""

from __future__ import annotations

from collections.abc import Iterator


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps, outermost first, each once (a chain may loop back on itself)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
