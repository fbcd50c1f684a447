"""`vit-attn view STORE`: browse a whole store's attention in a web browser.

`data` reads the store (lazily, read-only), `pictures` draws PNGs with the project's
rendering code, `server` answers HTTP; the page (`static/`) is plain HTML, CSS and
JavaScript shipped in the package: no build step, nothing fetched from elsewhere.
"""

from __future__ import annotations

from .server import DEFAULT_PORT, ViewServer, make_server, serve

__all__ = ["DEFAULT_PORT", "ViewServer", "make_server", "serve"]
