"""Files written through `tempfile.mkstemp` get the mode `open()` would have given them.

mkstemp creates files 0600 whatever the umask, so graphs, model records and store shards
written that way (to rename them into place atomically) were readable by their owner only:
a cache or a store shared by a group on a cluster was not.
"""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=1)
def umask() -> int:
    """This process's umask (read once), without changing it where Linux says it (threads
    may be creating files meanwhile); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_if_opened(path: str | os.PathLike[str]) -> None:
    """chmod `path` to 0666 less the umask, as a file created by `open(path, "w")` is."""
    os.chmod(path, 0o666 & ~umask())
