"""The headless Chromium that drives the viewer's page for screenshots, benchmarks and tests.

Debian's `chromium` package is used through Playwright's `executable_path`; Playwright's own
browser download (`playwright install`) is never needed. One place for the executable and
its flags, so a screenshot, a benchmark and a test see the page the same way.
"""

from __future__ import annotations

import os
import shutil

__all__ = ["CHROMIUM_ARGS", "chromium_executable"]

# No sandbox (CI runs as root in a container), no GPU, and nothing that reaches the network
# on its own: the page under test is the only thing loaded.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_executable() -> str | None:
    """`$VIT_ATTN_CHROMIUM`, else Debian's /usr/bin/chromium, else `chromium` on PATH; None if absent."""
    for candidate in (os.environ.get("VIT_ATTN_CHROMIUM"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium")
