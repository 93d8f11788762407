"""What a command prints: stylegen's own lines on the console (progress, warnings once, the summary last), the
rest in log files.

Python's loggers are set up here (plain ``message`` lines, ``warning: ...`` for warnings; ``--debug`` keeps
timestamps and logger names). Ray's Python loggers and Ray Data's are kept off the console by
:mod:`pipeline.session`; Ray's C++ core writes straight to file descriptor 2, which Python's logging cannot
reach, so :class:`CoreLinesOff` filters that descriptor.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading

# A glog line of Ray's C++ core: "[2026-12-07 19:32:28,878 E 4708 4708] core_worker.cc:2465: ...".
CORE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] ")
CORE_LOG = "stylegen-driver-core.log"
NOISY = ("botocore", "aiobotocore", "s3fs", "urllib3", "filelock", "fsspec")


class _Console(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        return f"warning: {text}" if record.levelno >= logging.WARNING else text


class _Once(logging.Filter):
    """A warning shown once per command, however many times it is logged."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


def setup_logging(quiet: bool, debug: bool) -> None:
    """The console of a command: INFO lines unless ``quiet`` (then errors only: the summary is the whole stdout),
    plain text, each warning once. ``--debug`` shows everything Ray shows, with timestamps and logger names."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    if debug:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        from pipeline.session import RAY_CONSOLE_ENV

        os.environ[RAY_CONSOLE_ENV] = "1"
    else:
        handler.setFormatter(_Console())
        handler.addFilter(_Once())
        # "Found credentials in environment variables" before an error would break its one line
        for name in NOISY:
            logging.getLogger(name).setLevel(logging.WARNING)
    root.addHandler(handler)
    root.setLevel(logging.ERROR if quiet else logging.INFO)


class CoreLinesOff:
    """``with CoreLinesOff():`` Ray's C++ core lines written to file descriptor 2 go to ``stylegen-driver-core.log``
    in the Ray session's log folder instead of the console; everything else written there passes unchanged.

    Python's own ``sys.stderr`` is pointed at a copy of the original descriptor, so what stylegen prints (a
    progress bar updated in place included) never goes through the filter; only C-level writes to descriptor 2
    do, and those come in whole lines. Hand-written: no library filters a file descriptor of the process."""

    def __init__(self) -> None:
        self._saved: int | None = None
        self._stderr = None
        self._held: list[bytes] = []
        self._thread: threading.Thread | None = None

    def __enter__(self) -> CoreLinesOff:
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            read, write = os.pipe()
            os.dup2(write, 2)
            os.close(write)
        except OSError:  # no descriptor 2 to filter (a daemon): nothing to do
            self._saved = None
            return self
        self._stderr = sys.stderr
        sys.stderr = io.TextIOWrapper(io.FileIO(os.dup(self._saved), "w"), line_buffering=True,
                                      encoding=getattr(self._stderr, "encoding", None) or "utf-8",
                                      errors="backslashreplace")
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self._stderr:
                handler.setStream(sys.stderr)
        self._thread = threading.Thread(target=self._pump, args=(read,), name="stylegen-core-lines", daemon=True)
        self._thread.start()
        return self

    def _pump(self, read: int) -> None:
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                if CORE_LINE.match(line):
                    self._keep(line)
                elif self._saved is not None:
                    with contextlib.suppress(OSError):
                        os.write(self._saved, line)

    def _keep(self, line: bytes) -> None:
        from pipeline.session import ray_logs_dir

        self._held.append(line)
        folder = ray_logs_dir()
        if folder:
            with contextlib.suppress(OSError), open(os.path.join(folder, CORE_LOG), "ab") as f:
                f.write(b"".join(self._held))
                self._held.clear()

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            return
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(self._saved, 2)  # the pipe's write end closes here (unless a child process still holds it)
        if self._thread is not None:
            self._thread.join(timeout=1)
        alive = self._thread is not None and self._thread.is_alive()  # a child process holds the pipe: let it be
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                handler.setStream(self._stderr)
        sys.stderr, replaced = self._stderr, sys.stderr
        with contextlib.suppress(Exception):
            replaced.close()
        if not alive:  # never close a descriptor the pump may still write to (its number could be reused)
            os.close(self._saved)
            self._saved = None
