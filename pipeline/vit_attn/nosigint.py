"""Worker processes that start with Ctrl-C ignored, while this process still answers it.

Ctrl-C reaches the terminal's whole process group, and a LocalCluster's worker processes must
leave it to the client, which closes them. Python starts with SIGINT ignored when its parent
ignored it, so the client used to ignore SIGINT while its cluster started, and a Ctrl-C in
those seconds was lost: the run went on to the end. Instead, multiprocessing spawns them
through a two-line shell launcher that ignores SIGINT and then runs this Python, and the
client holds a Ctrl-C until the start is over (`vit_attn.orchestrate`). Where the launcher
cannot run (no /bin/sh, a temporary folder mounted noexec), the caller ignores SIGINT as
before.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.spawn
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# What the launcher must give: a Python whose SIGINT is ignored from its first instruction.
_CHECK = "import signal, sys; sys.exit(signal.getsignal(signal.SIGINT) != signal.SIG_IGN)"


@contextlib.contextmanager
def spawning_without_sigint() -> Iterator[bool]:
    """Within: processes that multiprocessing spawns start with SIGINT ignored. Yields
    whether that holds; False means the caller must ignore SIGINT itself for them to."""
    if not sys.executable:
        yield False
        return
    folder = Path(tempfile.mkdtemp(prefix="vit-attn-launch-"))
    try:
        launcher = folder / "python"
        launcher.write_text(f"#!/bin/sh\ntrap '' INT\nexec {shlex.quote(sys.executable)} \"$@\"\n")
        launcher.chmod(0o700)
        if not _works(launcher):
            yield False
            return
        previous = multiprocessing.spawn.get_executable()
        multiprocessing.set_executable(str(launcher))
        try:
            yield True
        finally:
            multiprocessing.set_executable(previous)  # as it was (bytes on POSIX)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _works(launcher: Path) -> bool:
    try:
        done = subprocess.run(
            [str(launcher), "-c", _CHECK], capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0
