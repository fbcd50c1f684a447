"""Dask preload for LocalCluster workers: Ctrl-C is the client's to answer, not theirs, and
so is reporting a failed batch.

Ctrl-C reaches the terminal's whole process group. The first workers are spawned with SIGINT
ignored (inherited through spawn, vit_attn.orchestrate), but a worker the nanny restarts
after a crash is spawned later, from a process that answers SIGINT again; without this
preload it would print a KeyboardInterrupt traceback of its own when the user stops the run.

A batch that raises is reported by the client in one line (and retried, or the run stopped);
distributed's worker also logs it as "Compute Failed" with the traceback, pages of text per
attempt. Those records are dropped unless `vit-attn -v` asked for details
(VIT_ATTN_WORKER_TRACEBACKS=1, which it sets).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings
from typing import Any

TRACEBACKS_ENV = "VIT_ATTN_WORKER_TRACEBACKS"


class QuietTaskFailures(logging.Filter):
    """Drops distributed's "Compute Failed" records (the client reports the batch)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Compute Failed")


def dask_setup(worker: Any) -> None:
    """Called by distributed in each worker process as it starts (`preload=[__name__]`)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.environ.get(TRACEBACKS_ENV) != "1":
        logging.getLogger("distributed.worker").addFilter(QuietTaskFailures())
        warnings.showwarning = warning_as_line  # as in the client: no source lines
        ignore_unnamed_image_warnings()


def ignore_unnamed_image_warnings() -> None:
    """Without -v, Pillow's warnings are not shown: they never name the file ("Corrupt EXIF
    data. Expecting to read 2 bytes ..."), so a user cannot act on them; an image Pillow
    cannot decode fails alone with its reason in the store."""
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")


def warning_as_line(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Without -v, a warning is one `vit-attn: ...` line like the others (client and
    workers), not a source path and the line of code that raised it."""
    print(f"vit-attn: {message}", file=sys.stderr)
