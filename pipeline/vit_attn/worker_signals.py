"""Dask preload for LocalCluster workers: Ctrl-C is the client's to answer, not theirs.

Ctrl-C reaches the terminal's whole process group. The first workers are spawned with SIGINT
ignored (inherited through spawn, vit_attn.orchestrate), but a worker the nanny restarts
after a crash is spawned later, from a process that answers SIGINT again; without this
preload it would print a KeyboardInterrupt traceback of its own when the user stops the run.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


def dask_setup(worker: Any) -> None:
    """Called by distributed in each worker process as it starts (`preload=[__name__]`)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
