"""Pretrained weights without waiting on a hub that cannot be reached.

huggingface_hub retries each request five times with growing pauses, and timm asks for two
files, so an offline machine waited ~50 s before it learnt that the weights were not in its
cache. One short connection to the hub's endpoint first tells which case it is; an
unreachable hub turns on the hub's own offline mode for the load, so weights already in the
cache load at once and missing ones fail at once.
"""

from __future__ import annotations

import contextlib
import socket
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

# How long the one connection to the hub may take before it counts as unreachable.
PROBE_SECONDS = 5.0


def unreachable(endpoint: str, timeout: float = PROBE_SECONDS) -> str | None:
    """Why `endpoint`'s host cannot be connected to (name lookup or TCP), or None.

    None as well where a proxy is configured for its scheme: the proxy decides what is
    reachable, and only the real request through it can tell."""
    parts = urlsplit(endpoint)
    if not parts.hostname or parts.scheme not in ("http", "https"):
        return None
    proxies = urllib.request.getproxies()
    if (parts.scheme in proxies or "all" in proxies) and not urllib.request.proxy_bypass(
        parts.hostname
    ):
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except (OSError, ValueError) as exc:  # ValueError: a port out of range
        return str(exc) or type(exc).__name__


@contextlib.contextmanager
def offline_if_unreachable() -> Iterator[str | None]:
    """Within: the hub's offline mode if its endpoint cannot be reached. Yields the reason
    it could not (None when it can, or offline mode was on already)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        yield None
        return
    why = unreachable(constants.ENDPOINT)
    if why is None:
        yield None
        return
    constants.HF_HUB_OFFLINE = True  # what every request of the hub reads when it is made
    try:
        yield f"{constants.ENDPOINT} unreachable: {why}"
    finally:
        constants.HF_HUB_OFFLINE = False
