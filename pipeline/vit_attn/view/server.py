"""`vit-attn view STORE`: a read-only local web server over one store.

Standard library only (`http.server.ThreadingHTTPServer`). What a URL can reach is a fixed
list of routes: the page's own assets (a name -> bytes table filled from the package at
start-up; no URL is ever joined to a file-system path) and `/api/...` answers computed from
the store, addressed by image index. Requests are answered with PNG or JSON, read from the
store one chunk at a time. Only GET and HEAD exist. Bound to 127.0.0.1 unless told
otherwise; there, requests that name another host are refused (a web page elsewhere cannot
reach the server through DNS rebinding).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import math
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..errors import StoreError
from .data import MAX_PAGE, StoreData, ViewError, int_param, parse_query, parse_selection
from .pictures import Pictures

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
THUMB_BOX = 128
ASSET_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_ROUTE_PLAIN = re.compile(r"^/api/(meta|counts|list|summary)$")
_ROUTE_IMAGE = re.compile(r"^/api/(info|neighbours|imagestats)/(\d{1,12})$")
_ROUTE_PICTURE = re.compile(r"^/api/(input|map|overlay|grid)/(\d{1,12})\.(png|json)$")
_ROUTE_ASSET = re.compile(r"^/static/([A-Za-z0-9_-]{1,64}\.[a-z]{2,4})$")


def load_assets() -> dict[str, bytes]:
    """The page's files, read once from the package (`vit_attn/view/static/`)."""
    out = {}
    for entry in resources.files("vit_attn.view").joinpath("static").iterdir():
        if entry.is_file() and Path(entry.name).suffix in ASSET_TYPES:
            out[entry.name] = entry.read_bytes()
    if "index.html" not in out:
        raise StoreError(
            "the viewer's page (vit_attn/view/static/index.html) is missing from the package"
        )
    return out


def host_name(header: str) -> str:
    """A Host header's name without its port: `[::1]:9000` -> `[::1]`, `localhost` as is.
    What DNS rebinding changes is the name; the port is the client's business."""
    header = header.strip()
    if header.startswith("["):
        end = header.find("]")
        return header[: end + 1] if end > 0 and header[end + 1 :][:1] in ("", ":") else header
    name, colon, port = header.rpartition(":")
    return name if colon and port.isdigit() else header


class ViewServer(ThreadingHTTPServer):
    """The HTTP server with the store it serves; `url` is what to open in a browser."""

    daemon_threads = True
    # A restart right after Ctrl-C must not wait a minute for the old connections' TIME_WAIT.
    # On Linux and macOS this never lets two servers listen on one port (that needs
    # SO_REUSEPORT); on Windows SO_REUSEADDR would, so it stays off there.
    allow_reuse_address = sys.platform != "win32"

    def __init__(self, data: StoreData, host: str, port: int) -> None:
        self.data = data
        data.warm()
        self.pictures = Pictures(data)
        self.assets = load_assets()
        self._summary: tuple[int, dict[str, Any]] | None = None  # (data.generation, summary)
        self._summary_lock = threading.Lock()
        if ":" in host:
            self.address_family = socket.AF_INET6
        if not 0 <= port <= 65535:
            raise ViewError(f"--port {port}: give 0..65535 (0 = any free port)")
        try:
            super().__init__((host, port), Handler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ViewError(
                    f"port {port} on {host} is in use: pass --port with another number (0 = any free port)"
                ) from None
            raise ViewError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host"
            ) from None
        bound_port = self.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound_port}/"
        self.loopback_only = is_loopback(host)
        # The names a loopback server answers to, on any port: an SSH tunnel or an editor's
        # port forwarding reaches it on another local port, and port 80 is not written.
        self.allowed_hosts = {"127.0.0.1", "localhost", "[::1]", shown.lower()}

    def summary(self) -> dict[str, Any]:
        """Per (stat, layer, head): mean and percentiles over ok images (`analysis.summarise`);
        computed again once the store has changed (a run still writing it, a resume)."""
        self.data.ensure_current()
        with self._summary_lock:
            generation = self.data.generation
            if self._summary is None or self._summary[0] != generation:
                self._summary = (generation, _summary(self.data))
            return self._summary[1]


def _summary(data: StoreData) -> dict[str, Any]:
    import xarray as xr

    from ..analysis import summarise

    if not data.stats:
        raise ViewError(
            "this store holds no statistics: run with `attention.stats: true` "
            "(or `vit-attn stats --write STORE` when full attention is stored)"
        )
    try:
        # In memory from the cached columns (a few bytes per image): no dask graph to build.
        dims = ("image", "layer", "head")
        columns = {s: (dims, data.stat_table(s)) for s in data.stats}
        ds = xr.Dataset(
            {"status": (("image",), data.status()), **columns},
            coords={"layer": data.layers, "head": data.heads},
        )
        table = summarise(ds, data.stats)
    except StoreError as exc:
        raise ViewError(str(exc)) from None
    layers, heads = data.layers, data.heads
    out: dict[str, Any] = {
        "layers": layers,
        "heads": heads,
        "n": int(table["n"].iloc[0]),
        "stats": {},
    }
    for stat in data.stats:
        block = table.loc[stat]
        entry = {}
        for column in block.columns:
            if column == "n":
                continue
            grid = block[column].unstack("head").reindex(index=layers, columns=heads)
            entry[column] = [[_finite(v) for v in row] for row in grid.to_numpy().tolist()]
        out["stats"][stat] = entry
    return out


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


class Handler(BaseHTTPRequestHandler):
    server: ViewServer
    _extra_headers: dict[str, str]
    protocol_version = "HTTP/1.1"
    server_version = "vit-attn-view"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        log.info("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(head_only=True)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(head_only=False)

    def _not_allowed(self) -> None:
        """Any other method: a JSON 405 like every other refusal (not http.server's 501 page).
        Its body is not read, so the connection closes after the answer."""
        self.close_connection = True
        self._extra_headers = {"Allow": "GET, HEAD"}
        self._answer(head_only=False, refuse=ViewError("only GET and HEAD are served", 405))

    def __getattr__(self, name: str) -> Any:
        """http.server looks up `do_<METHOD>`: every method but GET and HEAD (POST, TRACE,
        PROPFIND, ...) gets the JSON 405."""
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _answer(self, head_only: bool, refuse: ViewError | None = None) -> None:
        try:
            if refuse is not None:
                raise refuse
            generation = self.server.data.generation
            try:
                status, ctype, body, cache = self._route()
            except ViewError:
                raise
            except Exception:
                if self.server.data.generation == generation:
                    raise
                # the store's layout was read again meanwhile (a resume, `stats --write`):
                # this answer mixed old and new; the next one reads the new throughout
                status, ctype, body, cache = self._route()
        except ViewError as exc:
            status, ctype, body, cache = exc.status, *_json_body({"error": str(exc)}), "no-store"
        except Exception as exc:  # a bug or an unreadable chunk: say so, keep serving
            replaced = self._replaced_store()
            if replaced is not None:  # the old metadata read against a new store's chunks
                status, ctype, body, cache = 409, *_json_body({"error": replaced}), "no-store"
            else:
                log.exception("error answering %s", self.path)
                body_err = {"error": f"{type(exc).__name__}: {exc}"}
                status, ctype, body, cache = 500, *_json_body(body_err), "no-store"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in getattr(self, "_extra_headers", {}).items():
            self.send_header(key, value)
        self._extra_headers = {}
        self.end_headers()
        if not head_only:
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the page moved on: nothing to do
                self.close_connection = True

    def _replaced_store(self) -> str | None:
        """Why the store can no longer be served, if it was replaced since the viewer opened it."""
        try:
            self.server.data.ensure_current(force=True)
        except ViewError as exc:
            return str(exc) if exc.status == 409 else None
        except Exception:  # noqa: BLE001 - the first failure is the one to report
            return None
        return None

    def _route(self) -> tuple[int, str, bytes, str]:
        if self.server.loopback_only:
            host = (self.headers.get("Host") or "").lower()
            if host_name(host) not in self.server.allowed_hosts:
                raise ViewError(f"host {host!r} is not this server", 403)
        if len(self.path) > 8192:
            raise ViewError("request line too long", 414)
        parts = urlsplit(self.path)
        path = parts.path  # never unquoted: no route needs it, and `%2e%2e` stays inert
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if path == "/favicon.ico":
            return 200, ASSET_TYPES[".svg"], self.server.assets["favicon.svg"], "max-age=3600"
        if path in ("/", "/index.html"):
            return 200, ASSET_TYPES[".html"], self.server.assets["index.html"], "no-cache"
        m = _ROUTE_ASSET.match(path)
        if m:
            name = m.group(1)
            if name not in self.server.assets:
                raise ViewError("not found", 404)
            cache = "max-age=3600" if name == "favicon.svg" else "no-cache"
            return 200, ASSET_TYPES[Path(name).suffix], self.server.assets[name], cache
        data, pictures = self.server.data, self.server.pictures
        data.ensure_current()
        m = _ROUTE_PLAIN.match(path)
        if m:
            what = m.group(1)
            if what == "meta":
                return 200, *_json_body(data.meta()), "no-cache"
            if what == "counts":
                return 200, *_json_body(data.counts()), "no-cache"
            if what == "summary":
                return 200, *_json_body(self.server.summary()), "no-cache"
            query = parse_query(params)
            page = data.page(query, int_param(params, "offset", 0), int_param(params, "limit", 60))
            return 200, *_json_body(page), "no-cache"
        if path == "/api/thumbs":
            # A page of thumbnails by `ids`, or by the list's own query + offset/limit (so the
            # page can ask for pictures and captions at the same time).
            if "ids" in params:
                ids = _ids(params["ids"], data.n_images)
            else:
                offset, limit = int_param(params, "offset", 0), int_param(params, "limit", 60)
                ids = data.page_ids(parse_query(params), offset, limit)
            box = int_param(params, "box", THUMB_BOX)
            if not 16 <= box <= 512:
                raise ViewError("box must be 16..512 pixels")
            (th, tw), body = pictures.thumbnails(ids, box)
            self._extra_headers = {
                "X-Thumbs": f"{ids.size},{th},{tw}",
                "X-Ids": ",".join(map(str, ids.tolist())),
            }
            return 200, "application/octet-stream", body, "no-cache"
        m = _ROUTE_IMAGE.match(path)
        if m:
            image = int(m.group(2))
            data.check_image(image)
            if m.group(1) == "neighbours":
                return 200, *_json_body(data.neighbours(parse_query(params), image)), "no-cache"
            if m.group(1) == "imagestats":
                return 200, *_json_body(data.image_stats(image)), "no-cache"
            return 200, *_json_body(data.info(image)), "no-cache"
        m = _ROUTE_PICTURE.match(path)
        if m:
            return self._picture(m.group(1), int(m.group(2)), m.group(3), params)
        raise ViewError("not found", 404)

    def _picture(
        self, what: str, image: int, fmt: str, params: dict[str, str]
    ) -> tuple[int, str, bytes, str]:
        data, pictures = self.server.data, self.server.pictures
        data.check_image(image)
        if what == "input":
            if fmt != "png":
                raise ViewError("not found", 404)
            return 200, "image/png", pictures.input_png(image), "no-cache"
        status = data.image_status(image)
        if status != 1:
            reason = (
                data.damage_of(image) or "it failed" if status == 2 else "it is not processed yet"
            )
            raise ViewError(f"image {image} has no attention: {reason}", 404)
        sel = parse_selection(params, data)
        if what == "grid":
            if fmt != "png":
                raise ViewError("not found", 404)
            return 200, "image/png", pictures.grid_png(image, sel), "no-cache"
        mask = _mask(params.get("mask", ""))
        if what == "overlay":
            if fmt != "png":
                raise ViewError("not found", 404)
            return 200, "image/png", pictures.overlay_png(image, sel, mask), "no-cache"
        if fmt == "png":
            return 200, "image/png", pictures.map_png(image, sel), "no-cache"
        from ..maps import mass_threshold_mask

        values = data.chosen_map(image, sel)
        src = data.source(sel.source)  # None for a full-attention row or diagonal
        has_layer = src is None or src.has_layer
        has_head = src is None or src.has_head
        body: dict[str, Any] = {
            "image": image,
            "source": sel.source,
            # A map without layers or heads (rollout) says so, whatever the query asked.
            "layer": data.layers[data.layer_index(sel.layer_index)]
            if data.layers and has_layer
            else None,
            "head": sel.head if has_head else None,
            "token": sel.token if sel.source == "row" else None,
            "shape": list(values.shape),
            "values": values.astype(np.float64).round(7).ravel().tolist(),
            "min": float(values.min()),
            "max": float(values.max()),
            "prefix_mass": data.prefix_mass(image, sel),
        }
        if mask is not None:
            body["mask"] = mass_threshold_mask(values, mask).astype(int).ravel().tolist()
        return 200, *_json_body(body), "no-cache"


def _json_body(value: Any) -> tuple[str, bytes]:
    return "application/json", json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def _ids(text: str, n_images: int) -> np.ndarray:
    if not text:
        return np.zeros(0, np.int64)
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError:
        raise ViewError("ids must be comma-separated image indices") from None
    if len(ids) > MAX_PAGE or not all(0 <= i < n_images for i in ids):
        raise ViewError(f"ids: at most {MAX_PAGE} indices in 0..{n_images - 1}")
    return np.asarray(ids, np.int64)


def _mask(text: str) -> float | None:
    if text == "":
        return None
    try:
        t = float(text)
    except ValueError:
        raise ViewError(f"mask must be a mass fraction in (0, 1], got {text!r}") from None
    if not 0.0 < t <= 1.0:
        raise ViewError(f"mask must be a mass fraction in (0, 1], got {text!r}")
    return t


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only: localhost, or any loopback address (127.0.0.0/8,
    ::1), however written; such a server answers only requests that name it (DNS rebinding)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def make_server(store: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> ViewServer:
    """A server over `store`, listening but not yet serving (call `serve_forever`)."""
    return ViewServer(StoreData(store), host, port)


def serve(store: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Serve until interrupted; prints the URL first."""
    server = make_server(store, host, port)
    print(f"vit-attn: serving {store} at {server.url}  (Ctrl-C to stop)", file=sys.stderr)
    if not is_loopback(host):
        print(
            f"vit-attn: listening on {host}: anyone who can reach this machine can read the store",
            file=sys.stderr,
        )
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


__all__ = ["DEFAULT_PORT", "ViewServer", "make_server", "serve"]
