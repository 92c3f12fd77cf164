"""Quiet terminals: gorp's own lines on the terminal, everything Ray, MLflow and transformers say in a log file.

    with run_log(run_dir) as path:      # <run_dir>/gorp.log
        ...                             # Ray's start-up lines, its C++ core-worker lines ("E ... core_worker.cc"),
                                        # warnings, tracebacks: all in the file

Ray writes some of its lines from C++ straight to the process's stderr, and the libraries' Python loggers write there
too, so the file takes over file descriptor 2 itself (``os.dup2``); gorp's own output goes to stdout through rich.
``verbose=True`` changes nothing: everything stays on the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

LOG_FILE = "gorp.log"


@contextlib.contextmanager
def run_log(run_dir: str | Path, *, verbose: bool = False) -> Iterator[Path | None]:
    """Send everything written to stderr (Ray's, MLflow's and transformers' loggers, which write there, Ray's C++
    lines, warnings) to ``<run_dir>/gorp.log`` (appended) while the block runs; yields the file's path."""
    if verbose:
        yield None
        return
    path = Path(run_dir) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1, encoding="utf-8") as log:
        sys.stderr.flush()
        stderr_fd = os.dup(2)
        os.dup2(log.fileno(), 2)
        logging.captureWarnings(True)  # through the logging module's last-resort handler: stderr, so the file
        try:
            yield path
        finally:
            logging.captureWarnings(False)
            sys.stderr.flush()
            os.dup2(stderr_fd, 2)
            os.close(stderr_fd)


def log_exception(path: Path | None, error: BaseException) -> None:
    """The full traceback of ``error`` into the log file (the terminal gets one or two lines)."""
    if path is None:
        return
    import traceback

    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(traceback.format_exception(error)))
