"""`vit-attn view`: the server on real stores, driven by headless Chromium through Playwright.

The store is a real run of the bundled demo ViT (full attention, statistics, overlays, one
broken file). Pictures are checked by pixel: the page's map is read back from the browser
and compared with the store's values coloured by matplotlib's own colormap (not the
viewer's code); grid thumbnails are compared with the stored overlays. Hand-made stores
with `pool_attention` / `received_attention` (models without a class token) go through
the same checks. Path traversal is tried with raw HTTP request lines, so no client
normalises the path first.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from vit_attn import open_store
from vit_attn.cli import main as cli_main
from vit_attn.demo import main as demo_main
from vit_attn.errors import StoreError
from vit_attn.render import model_input_image
from vit_attn.store import FORMAT
from vit_attn.view import data as view_data
from vit_attn.view import make_server
from vit_attn.view.data import ListQuery, StoreData, ViewError
from vit_attn.view.headless import CHROMIUM_ARGS, chromium_executable
from vit_attn.view.pictures import FAILED_RGB

from .helpers import logged

N_IMAGES = 12


# --------------------------------------------------------------------------- stores


def run_demo(out: Path, export_cache: Path) -> Path:
    """The demo run with full attention, in-process, plus one file that is not an image."""
    (out / "shapes" / "images").mkdir(parents=True)
    (out / "shapes" / "images" / "zz_broken.png").write_bytes(b"not an image")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            rc = demo_main(
                [
                    "--out",
                    str(out),
                    "--n",
                    str(N_IMAGES),
                    "--seed",
                    "7",
                    "--set",
                    f"inference.cache_dir={export_cache}",
                    "--set",
                    "attention.full=true",
                    "--set",
                    "cluster.kind=none",
                ]
            )
    finally:
        mp.undo()
    assert rc == 0
    (out / "demo_stderr.txt").write_text(said.getvalue())
    return out / "demo.zarr"


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory, export_cache) -> Path:
    return run_demo(tmp_path_factory.mktemp("view-demo"), export_cache)


def handmade_store(path: Path, array: str, pool_heads: int = 0, heads: int = 2) -> Path:
    """A store written with zarr directly: no class token, a 3 x 4 grid, one map array.

    `pool_attention` is (image, head, y, x), or (image, pool_head, y, x) with `pool_heads`
    heads of its own; `received_attention` (image, layer, head, y, x); statuses ok, ok,
    failed, ok, pending; no preprocessing recorded (no source images).
    """
    rng = np.random.default_rng(5)
    n, layers, grid = 5, [0, 1], (3, 4)
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.attrs.update(
        format=FORMAT,
        format_version=1,
        model={
            "name": "handmade",
            "num_prefix_tokens": 0,
            "grid": list(grid),
            "patch_size": [8, 8],
            "input_size": [3, 24, 32],
            "depth": 2,
            "num_heads": heads,
        },
    )

    def put(name, data, dims, dtype=None):
        data = np.asarray(data, dtype=dtype)
        arr = g.create_array(
            name, shape=data.shape, dtype=data.dtype, fill_value=0, dimension_names=dims
        )
        arr[...] = data

    paths = g.create_array(
        "image_path", shape=(n,), dtype=str, fill_value="", dimension_names=("image",)
    )
    paths[...] = np.array([f"im{i}.png" for i in range(n)])
    errors = g.create_array(
        "error", shape=(n,), dtype=str, fill_value="", dimension_names=("image",)
    )
    errors[...] = np.array(["", "", "truncated file", "", ""])
    put("status", [1, 1, 2, 1, 0], ("image",), np.int8)
    put("layer", layers, ("layer",), np.int32)
    put("head", list(range(heads)), ("head",), np.int32)
    if array == "pool_attention" and pool_heads:
        put("pool_head", list(range(pool_heads)), ("pool_head",), np.int32)
        shape, dims = (n, pool_heads, *grid), ("image", "pool_head", "y", "x")
    elif array == "pool_attention":
        shape, dims = (n, heads, *grid), ("image", "head", "y", "x")
    else:
        shape, dims = (n, len(layers), heads, *grid), ("image", "layer", "head", "y", "x")
    maps = rng.dirichlet(np.ones(grid[0] * grid[1]), size=shape[:-2]).reshape(shape)
    maps[[2, 4]] = 0  # failed and pending images hold zeros
    put(array, maps, dims, np.float16)
    return path


# --------------------------------------------------------------------------- references


def lut(name: str) -> np.ndarray:
    """matplotlib's colormap as 256 RGB rows (the reference, not the viewer's table)."""
    from matplotlib import colormaps

    return np.round(colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255.0)


def expected_levels(values: np.ndarray) -> np.ndarray:
    """The colour-table index of each patch: the map's own min..max onto 0..255, rounded."""
    v = np.asarray(values, np.float64)
    span = v.max() - v.min()
    norm = (v - v.min()) / span if span > 0 else np.zeros_like(v)
    return np.floor(norm * 255.0 + 0.5).astype(int)


def levels_of(rgb: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Invert a colour table: the nearest entry's index per pixel [..., 3]."""
    d = ((rgb[..., None, :].astype(np.float64) - table) ** 2).sum(-1)
    return d.argmin(-1)


def assert_map_matches(rgb: np.ndarray, values: np.ndarray, cmap: str) -> None:
    """Each pixel of a one-pixel-per-patch map is its patch's value's colour (±1 level for
    float32 vs float64 rounding), and the map is not flat."""
    assert rgb.shape[:2] == values.shape, (rgb.shape, values.shape)
    got, want = levels_of(rgb, lut(cmap)), expected_levels(values)
    assert np.abs(got - want).max() <= 1, np.argwhere(np.abs(got - want) > 1)[:5]
    assert (got == want).mean() >= 0.9
    assert want.max() == 255 and want.min() == 0


def colormap_of(store: Path) -> str:
    attrs = zarr.open_group(str(store), mode="r").attrs
    return (attrs.get("config") or {}).get("output", {}).get("colormap", "inferno")


# --------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def server(demo_store) -> Iterator:
    srv = make_server(demo_store, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def raw_request(port: int, target: str, method: str = "GET", host: str | None = None) -> bytes:
    """Send one request line exactly as given (no client-side normalisation of `..`)."""
    host = host or f"127.0.0.1:{port}"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


TRAVERSALS = [
    "/../../../../etc/passwd",
    "/static/../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/static/..%2f..%2f..%2fetc%2fpasswd",
    "/static/....//....//etc/passwd",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "//etc/passwd",
    "/etc/passwd",
    "/static/app.js/../../../../etc/passwd",
    "/api/input/0.png/../../../../etc/passwd",
    "/api/map/..%2f..%2fzarr.json",
    "/zarr.json",
    "/status/zarr.json",
    "/overlay/c/0/0/0/0",
    "/static/zarr.json",
    "/static/server.py",
    "/static/__init__.py",
    "http://127.0.0.1/../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/static/%00index.html",
    "/api/thumbs/../../../etc/passwd",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_no_file_outside_the_page_and_the_api_is_reachable(server, demo_store, target):
    """Traversal attempts (literal, %-encoded, doubled slashes, absolute paths, the store's own
    files by name) answer 404 and never return file contents."""
    port = server.server_address[1]
    response = raw_request(port, target)
    assert status_of(response) == 404, (target, response[:200])
    assert b"root:" not in response and b"zarr_format" not in response
    assert b"import " not in response


def test_only_get_and_head_and_only_this_host(server):
    port = server.server_address[1]
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND"):
        answer = raw_request(port, "/api/meta", method)
        assert status_of(answer) == 405, method
        assert b"Allow: GET, HEAD" in answer and b'{"error":"only GET and HEAD' in answer
    head = raw_request(port, "/api/meta", "HEAD")
    assert status_of(head) == 200 and head.split(b"\r\n\r\n", 1)[1] == b""
    # DNS rebinding: a page on another origin that resolves to 127.0.0.1 is refused.
    assert status_of(raw_request(port, "/api/meta", host="evil.example:80")) == 403
    assert status_of(raw_request(port, "/api/meta", host=f"localhost:{port}")) == 200
    # through an SSH tunnel or an editor's port forwarding: another local port, or none
    for host in ("127.0.0.1:9000", "localhost", "[::1]:9001", "LOCALHOST:80"):
        assert status_of(raw_request(port, "/api/meta", host=host)) == 200, host
    for host in ("evil.example", "127.0.0.1.evil.example:80", "[::1]x:80", "localhost:80x"):
        assert status_of(raw_request(port, "/api/meta", host=host)) == 403, host


def test_bad_parameters_are_one_clear_json_error(server):
    for path, words in [
        ("api/list?limit=100000", "limit"),
        ("api/list?min=abc&stat=cls_entropy", "min must be a number"),
        ("api/list?status=bogus", "status must be one of"),
        ("api/list?stat=nope&sort=stat", "not stored"),
        ("api/list?min=1", "need a statistic"),
        ("api/map/0.json?layer=99", "layer index 99"),
        ("api/map/0.json?head=7", "head must be"),
        ("api/map/0.json?source=nope", "not in this store"),
        ("api/map/0.json?source=row&token=100000", "token 100000"),
        ("api/overlay/0.png?mask=1.5", "mask must be"),
        ("api/map/99999.png", "out of range"),
        ("api/thumbs?ids=1,x", "ids"),
        ("api/thumbs?ids=999999999999999999999999999999", "ids"),  # was a 500 (OverflowError)
        ("api/thumbs?ids=-999999999999999999999999999999", "ids"),
        ("api/thumbs?ids=0&box=4", "box"),
        # Characters str.isdigit() accepts and int() refuses: a 400, never a 500.
        ("api/map/0.json?head=%C2%B2", "head must be"),
        ("api/list?top1=%C2%B2", "top1 must be"),
        ("api/map/0.json?layer=%C2%B2", "layer must be an integer"),
    ]:
        code, body, ctype = get(server.url + path)
        assert code in (400, 404), path
        assert ctype == "application/json"
        assert words in json.loads(body)["error"], (path, body)


def test_api_values_are_the_stores(server, demo_store):
    """Map JSON and PNGs are the stored values: CLS maps, a token's row, the diagonal."""
    g = zarr.open_group(str(demo_store), mode="r")
    cmap = colormap_of(demo_store)
    prefix = g.attrs["model"]["num_prefix_tokens"]
    gh, gw = g.attrs["model"]["grid"]
    cls = np.asarray(g["cls_attention"][3], np.float64)  # [L, H, gh, gw]
    att = np.asarray(g["attention"][3], np.float64)  # [L, H, T, T]
    cases = [
        ("source=cls_attention&layer=2&head=1", cls[2, 1]),
        ("source=cls_attention&layer=-1&head=max", cls[-1].max(0)),
        (
            "source=row&layer=4&head=0&token=" + str(prefix + 2 * gw + 5),
            att[4, 0, prefix + 2 * gw + 5, prefix:],
        ),
        ("source=row&layer=1&head=mean&token=0", att[1, :, 0, prefix:].mean(0)),
        ("source=diag&layer=0&head=2", np.diagonal(att[0, 2, prefix:, prefix:])),
        ("source=rollout", np.asarray(g["rollout"][3], np.float64)),
    ]
    for query, want in cases:
        want = want.reshape(gh, gw)
        code, body, _ = get(f"{server.url}api/map/3.json?{query}")
        assert code == 200, body
        got = json.loads(body)
        np.testing.assert_allclose(
            np.reshape(got["values"], (gh, gw)), want, atol=2e-6, err_msg=query
        )
        code, png, ctype = get(f"{server.url}api/map/3.png?{query}")
        assert code == 200 and ctype == "image/png"
        assert_map_matches(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), want, cmap)
    # the row's prefix mass is what the row puts on prefix keys
    code, body, _ = get(f"{server.url}api/map/3.json?source=row&layer=4&head=0&token=9&mask=0.6")
    got = json.loads(body)
    assert got["prefix_mass"] == pytest.approx(att[4, 0, 9, :prefix].sum(), abs=1e-6)
    assert 0 < sum(got["mask"]) < gh * gw


def test_list_filters_and_sorts_match_numpy(server, demo_store):
    g = zarr.open_group(str(demo_store), mode="r")
    status = g["status"][:]
    top1 = g["topk_index"][:, 0]
    entropy = np.asarray(g["cls_entropy"][:], np.float64)[:, -1].mean(-1)

    def ids(query: str) -> list[int]:
        code, body, _ = get(f"{server.url}api/list?limit=500&{query}")
        assert code == 200, body
        page = json.loads(body)
        assert page["total"] == len(page["items"])
        return [item["i"] for item in page["items"]]

    assert ids("") == list(range(status.size))
    assert ids("status=failed") == np.flatnonzero(status == 2).tolist()
    assert ids("top1=1") == np.flatnonzero((top1 == 1) & (status == 1)).tolist()
    ok = np.flatnonzero(status == 1)
    lo = float(np.median(entropy[ok]))
    assert ids(f"stat=cls_entropy&slayer=-1&shead=mean&min={lo}") == [
        int(i) for i in ok if entropy[i] >= lo
    ]
    order = ok[np.argsort(-entropy[ok], kind="stable")]
    assert ids("stat=cls_entropy&slayer=-1&shead=mean&sort=stat&order=desc") == order.tolist()
    # a failed image shows its error in the list
    code, body, _ = get(f"{server.url}api/list?status=failed")
    assert "not an image" in json.loads(body)["items"][0]["error"]


@pytest.mark.parametrize("array", ["pool_attention", "received_attention"])
def test_stores_without_a_class_token_show_their_maps(tmp_path, array):
    """A store holding only pool_attention or received_attention: its maps, by head and
    layer, with rows refused with the config key that enables them."""
    store = handmade_store(tmp_path / "hand.zarr", array)
    maps = np.asarray(zarr.open_group(str(store), mode="r")[array][:], np.float64)
    srv = make_server(store, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        meta = json.loads(get(srv.url + "api/meta")[1])
        assert [s["name"] for s in meta["sources"]] == [array]
        assert meta["sources"][0]["has_layer"] == (array == "received_attention")
        assert "attention.full: true" in meta["full_attention_hint"]
        for image, layer, head in [(0, 0, "1"), (3, 1, "0"), (1, 1, "mean")]:
            want = maps[image] if array == "pool_attention" else maps[image, layer]
            want = want.mean(0) if head == "mean" else want[int(head)]
            q = f"source={array}&layer={layer}&head={head}"
            got = json.loads(get(f"{srv.url}api/map/{image}.json?{q}")[1])
            np.testing.assert_allclose(np.reshape(got["values"], (3, 4)), want, atol=2e-6)
            png = get(f"{srv.url}api/map/{image}.png?{q}")[1]
            assert_map_matches(
                np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), want, "inferno"
            )
        code, body, _ = get(f"{srv.url}api/map/0.json?source=row&token=0")
        assert code == 400 and "attention.full: true" in json.loads(body)["error"]
        code, body, _ = get(f"{srv.url}api/map/2.png")
        assert code == 404 and "failed" in json.loads(body)["error"]
        code, body, _ = get(f"{srv.url}api/map/4.png")
        assert code == 404 and "not processed" in json.loads(body)["error"]
        with urllib.request.urlopen(f"{srv.url}api/thumbs?ids=0,1,2,3,4") as r:
            assert r.headers["X-Thumbs"] == "5,24,32"
            thumbs = np.frombuffer(r.read(), np.uint8).reshape(5, 24, 32, 3)
        assert (thumbs[2] == [120, 30, 30]).all() and (thumbs[4] == [70, 70, 70]).all()
        assert thumbs[0].std() > 0  # grey canvas (no source images) blended with the map
        code, body, _ = get(f"{srv.url}api/summary")
        assert code == 400 and "attention.stats: true" in json.loads(body)["error"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_one_head_store_refuses_other_heads(tmp_path):
    # head=7 on a one-head store was accepted and echoed back as if it were drawn.
    store = handmade_store(tmp_path / "one.zarr", "received_attention", heads=1)
    with serving(store) as srv:
        for head, code in [("0", 200), ("mean", 200), ("-1", 400), ("7", 400)]:
            got = get(f"{srv.url}api/map/0.json?source=received_attention&head={head}")
            assert got[0] == code, (head, got[1][:200])


# --------------------------------------------------------------------------- the command


def _view_command(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vit_attn.cli", "view", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_cli_serves_on_loopback_and_says_where(demo_store):
    proc = _view_command(str(demo_store), "--port", "0")
    try:
        line = proc.stderr.readline()
        m = re.search(r"at (http://127\.0\.0\.1:(\d+)/)", line)
        assert m, line
        code, body, _ = get(m.group(1) + "api/meta")
        assert code == 200 and json.loads(body)["n_images"] == N_IMAGES + 6
        # the port it holds is refused to a second server, in one line
        second = subprocess.run(
            [sys.executable, "-m", "vit_attn.cli", "view", str(demo_store), "--port", m.group(2)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1 and "is in use" in second.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_viewer_restarted_on_its_port_right_away_starts(demo_store):
    # The server closes each answered connection first, so the old connections sit in
    # TIME_WAIT on its port for a minute: a restart said "port in use" until they expired.
    first = make_server(demo_store, "127.0.0.1", 0)
    port = first.server_address[1]
    thread = threading.Thread(target=first.serve_forever, daemon=True)
    thread.start()
    for _ in range(3):
        assert get(f"{first.url}api/meta")[0] == 200
    first.shutdown()
    first.server_close()
    again = make_server(demo_store, "127.0.0.1", port)
    again.server_close()


def test_demo_ends_with_the_view_command(demo_store):
    said = (demo_store.parent / "demo_stderr.txt").read_text().strip().splitlines()
    exe, *rest = said[-1].split()
    assert rest == ["view", str(demo_store)]
    # Runnable when pasted: on PATH, or the path of this install's script (.venv/bin/...).
    assert shutil.which(exe) or Path(exe).exists(), exe


@pytest.mark.parametrize(
    "args, words",
    [
        (["--port", "99999"], "give 0..65535"),
        (
            ["--port", "0", "--host", "no-such-host.invalid"],
            "cannot listen on no-such-host.invalid",
        ),
    ],
)
def test_cli_bad_port_or_host_is_one_line(demo_store, args, words):
    r = subprocess.run(
        [sys.executable, "-m", "vit_attn.cli", "view", str(demo_store), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


def test_cli_refuses_what_is_not_a_store(tmp_path):
    (tmp_path / "plain").mkdir()
    for target in (tmp_path / "plain", tmp_path / "missing"):
        r = subprocess.run(
            [sys.executable, "-m", "vit_attn.cli", "view", str(target), "--port", "0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "is not a vit-attention store" in r.stderr


# --------------------------------------------------------------------------- damaged or moving stores


def copy_of_demo(demo_store: Path, tmp_path: Path) -> Path:
    """The demo's output folder copied (store and images), the store pointed at its copy of the
    images, so a test may change images or store files without touching the shared one."""
    out = tmp_path / "demo"
    shutil.copytree(demo_store.parent, out)
    store = out / demo_store.name
    g = zarr.open_group(str(store), mode="r+")
    root = Path(g.attrs["image_root"])
    new_root = out / root.relative_to(demo_store.parent)
    g.attrs["image_root"] = str(new_root)
    for rel in g["image_path"][:]:  # keep each file's recorded identity true (mtime)
        src = root / str(rel)
        if src.exists():
            st = src.stat()
            os.utime(new_root / str(rel), ns=(st.st_atime_ns, st.st_mtime_ns))
    return store


def show(store: Path, *args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli_main(["show", str(store), *args])
    return rc, err.getvalue()


@contextlib.contextmanager
def serving(store: Path) -> Iterator:
    srv = make_server(store, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def test_show_refuses_layers_and_heads_the_model_does_not_have(demo_store, tmp_path):
    depth = zarr.open_group(str(demo_store), mode="r").attrs["model"]["depth"]
    out = str(tmp_path / "x.png")
    for args, words in [
        (["--image", "0", "--layer", str(depth)], f"blocks 0..{depth - 1}"),  # was block 0
        (["--image", "0", "--layer", str(-depth - 1)], f"blocks 0..{depth - 1}"),  # was the last
        (["--image", "0", "--head", "²"], "--head '²'"),
        (["--image", "²"], "not in the store"),
    ]:
        rc, err = show(demo_store, *args, "-o", out)
        assert rc == 2, (args, err)
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not Path(out).exists()
    rc, _ = show(demo_store, "--image", "0", "--layer", str(-depth), "-o", out)
    assert rc == 0 and Path(out).exists()


@pytest.mark.parametrize("normalize", ["dataset", "per_image", "per_map"])
def test_the_grids_mean_tile_is_the_mean_picture(demo_store, tmp_path, normalize):
    # With --normalize dataset the grid's mean tile averaged the heads after scaling each by
    # its own scale, while --head mean scales the mean map by the mean scale (up to 61 levels).
    from vit_attn.render import GRID_BORDER

    ok = int(np.flatnonzero(np.asarray(zarr.open_group(str(demo_store))["status"][:]) == 1)[0])
    pictures = {}
    for head in ("grid", "mean"):
        out = tmp_path / f"{head}.png"
        args = ["--image", str(ok), "--head", head, "--normalize", normalize, "-o", str(out)]
        assert show(demo_store, *args)[0] == 0
        pictures[head] = np.asarray(Image.open(out).convert("RGB")).astype(int)
    mean = pictures["mean"]
    h, w = mean.shape[:2]
    tile = pictures["grid"][GRID_BORDER : GRID_BORDER + h, GRID_BORDER : GRID_BORDER + w]
    below_label = slice(h // 2, h)
    assert np.abs(tile[below_label] - mean[below_label]).max() <= 1


def test_show_draws_with_the_runs_alpha_and_colormap_by_default(demo_store, tmp_path):
    # show used alpha 0.5 whatever the run's output.overlay_alpha (0.55 in the demo), so its
    # picture differed from the stored overlay and the viewer's by up to 13 levels.
    g = zarr.open_group(str(demo_store), mode="r")
    assert g.attrs["config"]["output"]["overlay_alpha"] != 0.5
    ok = int(np.flatnonzero(np.asarray(g["status"][:]) == 1)[0])
    out = tmp_path / "mean.png"
    assert show(demo_store, "--image", str(ok), "-o", str(out))[0] == 0
    drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert np.abs(drawn - np.asarray(g["overlay"][ok]).astype(int)).max() <= 1
    assert show(demo_store, "--image", str(ok), "--alpha", "0.5", "-o", str(out))[0] == 0
    other = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert np.abs(other - drawn).max() > 1  # an explicit --alpha still wins


def test_prefix_tokens_are_named_by_the_stores_roles(demo_store, tmp_path):
    assert StoreData(demo_store).token_names() == ["CLS"]
    store = tmp_path / "roles.zarr"
    g = zarr.open_group(str(store), mode="w", zarr_format=3)
    src = zarr.open_group(str(demo_store), mode="r")
    attrs = dict(src.attrs)
    attrs["model"] = {**attrs["model"], "num_prefix_tokens": 4}
    roles = ["class", "register", "register", "distillation"]
    attrs["token_roles"] = {**attrs.get("token_roles", {}), "prefix_roles": roles}
    g.attrs.update(attrs)
    for name in ("status", "image_path"):
        g.create_array(name, data=np.asarray(src[name][:]), dimension_names=("image",))
    assert StoreData(store).token_names() == ["CLS", "register 0", "register 1", "distillation"]
    # A register-only model (no class token): token 0 is a register, never "CLS".
    attrs["model"]["num_prefix_tokens"] = 1
    attrs["token_roles"]["prefix_roles"] = ["register"]
    g.attrs.update(attrs)
    assert StoreData(store).token_names() == ["register 0"]


def test_the_viewer_follows_a_store_that_is_still_being_written(demo_store, tmp_path, monkeypatch):
    store = copy_of_demo(demo_store, tmp_path)
    g = zarr.open_group(str(store), mode="r+")
    final = np.asarray(g["status"][:])
    g["status"][:] = np.where(np.arange(final.size) < 4, final, 0)  # a run 4 images in
    data = StoreData(store)
    assert data.counts()["pending"] == final.size - 4
    assert data.page(ListQuery(status="pending"), 0, 100)["total"] == final.size - 4
    g["status"][:] = final  # the run finishes
    monkeypatch.setattr(view_data, "STATUS_RECHECK_SECONDS", 0.0)
    data._next_status_check = 0.0
    assert data.counts()["pending"] == 0
    assert data.page(ListQuery(status="pending"), 0, 100)["total"] == 0
    assert data.page(ListQuery(status="ok"), 0, 100)["total"] == int((final == 1).sum())
    np.testing.assert_array_equal(data.statuses(np.arange(final.size)), final)
    # `run --overwrite` with another config replaces the store: no stale answers, one reason.
    g.attrs["fingerprint"] = "another run"
    data._next_status_check = 0.0
    with pytest.raises(ViewError, match="was replaced since the viewer opened it") as err:
        data.counts()
    assert err.value.status == 409
    with pytest.raises(ViewError, match="was replaced"):
        data.page(ListQuery(status="ok"), 0, 10)


def test_every_route_answers_409_once_the_store_is_replaced(demo_store, tmp_path):
    # After `run --overwrite` under the viewer, meta, summary, list, info, thumbnails by id,
    # inputs and neighbours kept answering from the old store, and reads of the new store's
    # chunks through the old metadata were 500s with tracebacks.
    store = copy_of_demo(demo_store, tmp_path)
    g = zarr.open_group(str(store), mode="r+")
    ok = int(np.flatnonzero(np.asarray(g["status"][:]) == 1)[0])
    routes = [
        "api/meta",
        "api/counts",
        "api/summary",
        "api/list?offset=0&limit=5",
        "api/thumbs?ids=0,1",
        f"api/info/{ok}",
        f"api/imagestats/{ok}",
        f"api/neighbours/{ok}",
        f"api/input/{ok}.png",
        f"api/overlay/{ok}.png",
        f"api/grid/{ok}.png",
        f"api/map/{ok}.png",
    ]
    with serving(store) as srv:
        before = {r: get(srv.url + r)[0] for r in routes}
        assert set(before.values()) <= {200, 404} and before["api/meta"] == 200, before
        # Another run's store now lies there: its chunks do not decode with the old metadata.
        g.attrs["fingerprint"] = "another run"
        chunks = [p for p in (store / "cls_attention").rglob("*") if p.is_file() and "c" in p.parts]
        for chunk in chunks:
            chunk.write_bytes(bytes(chunk.stat().st_size))
        srv.data._chunks.clear()
        srv.data._next_status_check = float("inf")  # the periodic check has not come round yet
        code, body, _ = get(f"{srv.url}api/map/{ok}.png")
        assert code == 409 and "was replaced" in json.loads(body)["error"], (code, body[:300])
        for r in routes:  # and from then on, every route
            code, body, _ = get(srv.url + r)
            assert code == 409 and "restart vit-attn view" in json.loads(body)["error"], r


def rerun_config(store: Path, export_cache: Path) -> Path:
    """The config the store was made with, pointed at its copy (images and store)."""
    g = zarr.open_group(str(store), mode="r")
    cfg = json.loads(json.dumps(g.attrs["config"]))
    cfg["data"]["source"] = g.attrs["image_root"]
    cfg["output"].update(store=str(store), png_dir=None, overwrite=False)
    cfg["inference"]["cache_dir"] = str(export_cache)
    cfg["cluster"]["kind"] = "none"
    path = store.parent / "again.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_a_store_replaced_under_the_viewer_is_noticed_at_the_next_request(
    demo_store, tmp_path, export_cache
):
    # For up to STATUS_RECHECK_SECONDS after `run --overwrite` replaced the store, the viewer
    # answered from the old layout: old layers in meta, "ok" images that were pending, zero
    # statistics. A local store's root is now looked at on every request.
    store = copy_of_demo(demo_store, tmp_path)
    data = StoreData(store)
    assert data.counts()["ok"] > 0
    config = rerun_config(store, export_cache)
    args = ["run", str(config), "--no-progress", "--overwrite", "--set", "attention.layers=[0]"]
    assert cli_main(args) == 0
    data._next_status_check = float("inf")  # the periodic check has not come round yet
    with pytest.raises(ViewError, match="was replaced since the viewer opened it") as err:
        data.counts()
    assert err.value.status == 409


def test_the_viewer_forgets_what_a_resume_redid(tmp_path, export_cache):
    # After `run --redo-changed` under a running viewer, the overlay was the new map over the
    # old decoded input, thumbnails and the statistics summary stayed those of the old
    # images: the status array reads the same before and after, so nothing was dropped.
    store = run_demo(tmp_path, export_cache)
    g = zarr.open_group(str(store), mode="r")
    status = np.asarray(g["status"][:])
    ok = int(np.flatnonzero(status == 1)[0])
    source = Path(g.attrs["image_root"]) / str(g["image_path"][ok])
    with serving(store) as srv:
        srv.data._next_status_check = float("inf")  # only a changed store may trigger a read
        old_input = get(f"{srv.url}api/input/{ok}.png")[1]
        old_thumb = get(f"{srv.url}api/thumbs?ids={ok}")[1]
        old_summary = json.loads(get(f"{srv.url}api/summary")[1])
        picture = np.zeros((48, 64, 3), np.uint8)
        picture[:, :32] = (255, 255, 255)  # another picture, unlike the demo's shapes
        Image.fromarray(picture).save(source, format="PNG")
        rc = cli_main(["run", str(rerun_config(store, export_cache)), "--redo-changed"])
        assert rc == 0
        srv.data._next_status_check = 0.0  # the periodic check comes round
        new = zarr.open_group(str(store), mode="r")
        np.testing.assert_array_equal(np.asarray(new["status"][:]), status)  # no clue there
        code, body, _ = get(f"{srv.url}api/input/{ok}.png")
        assert code == 200 and body != old_input
        got = np.asarray(Image.open(io.BytesIO(body)))
        np.testing.assert_array_equal(got, model_input_image(new, ok))
        code, thumb, _ = get(f"{srv.url}api/thumbs?ids={ok}")
        assert code == 200 and thumb != old_thumb
        summary = json.loads(get(f"{srv.url}api/summary")[1])
        assert summary != old_summary  # one image's statistics changed
        code, body, _ = get(f"{srv.url}api/overlay/{ok}.png?head=mean")
        drawn = np.asarray(Image.open(io.BytesIO(body)))
        stored = np.asarray(new["overlay"][ok])
        assert np.abs(drawn.astype(int) - stored.astype(int)).max() <= 1
        shutil.rmtree(store)  # a deleted store is not said to be "replaced"
        srv.data._next_status_check = 0.0
        code, body, _ = get(f"{srv.url}api/counts")
        assert code == 409 and "moved, deleted or damaged" in json.loads(body)["error"]


def test_what_was_read_while_the_store_changed_is_not_kept(demo_store, tmp_path, monkeypatch):
    # A decode or chunk read that straddled a change was cached under the new generation and
    # served from then on; meta built before a reload was kept after it.
    from vit_attn.view import pictures as view_pictures
    from vit_attn.view.pictures import Pictures

    store = copy_of_demo(demo_store, tmp_path)
    data = StoreData(store)
    pics = Pictures(data)
    ok = int(np.flatnonzero(data.status() == 1)[0])
    decodes = []
    real = view_pictures.model_input_image

    def decode_while_the_store_changes(group, image):
        decodes.append(image)
        with data._lock:
            data._forget()  # what a resume seen by another request does meanwhile
        return real(group, image)

    monkeypatch.setattr(view_pictures, "model_input_image", decode_while_the_store_changes)
    pics.model_input(ok)
    pics.model_input(ok)
    assert decodes == [ok, ok]  # the first decode was not kept
    monkeypatch.setattr(view_pictures, "model_input_image", real)

    real_read = view_data.read_rows

    def read_while_the_store_changes(*args, **kwargs):
        with data._lock:
            data._forget()
        return real_read(*args, **kwargs)

    monkeypatch.setattr(view_data, "read_rows", read_while_the_store_changes)
    data._chunk("cls_attention", ok)
    assert ("cls_attention", ok) not in data._chunks
    monkeypatch.setattr(view_data, "read_rows", real_read)
    data._chunk("cls_attention", ok)
    assert ("cls_attention", ok) in data._chunks

    # meta follows a reload: statistics dropped from the store leave the page's controls
    assert "cls_max" in [s["name"] for s in data.meta()["stats"]]
    g = zarr.open_group(str(store), mode="r+")
    del g["cls_max"]
    g.attrs["run_id"] = "a resume"
    monkeypatch.setattr(view_data, "STATUS_RECHECK_SECONDS", 0.0)
    data._next_status_check = 0.0
    data.counts()
    assert "cls_max" not in [s["name"] for s in data.meta()["stats"]]
    assert "cls_max" not in data.stats


def test_show_says_when_the_input_image_is_gone_and_draws_on_grey(demo_store, tmp_path, caplog):
    store = copy_of_demo(demo_store, tmp_path)
    g = zarr.open_group(str(store), mode="r")
    ok = int(np.flatnonzero(np.asarray(g["status"][:]) == 1)[0])
    (Path(g.attrs["image_root"]) / str(g["image_path"][ok])).unlink()
    caplog.clear()
    assert show(store, "--image", str(ok), "-o", str(tmp_path / "grey.png"))[0] == 0
    said = logged(caplog, "drawn on grey")
    assert len(said) == 1 and f"image {ok}:" in said[0], said


def test_a_source_image_changed_since_the_run_is_never_drawn_under_old_maps(demo_store, tmp_path):
    store = copy_of_demo(demo_store, tmp_path)
    g = zarr.open_group(str(store), mode="r")
    ok = int(np.flatnonzero(np.asarray(g["status"][:]) == 1)[0])
    assert show(store, "--image", str(ok), "-o", str(tmp_path / "before.png"))[0] == 0
    source = Path(g.attrs["image_root"]) / str(g["image_path"][ok])
    Image.new("RGB", (64, 48), (0, 200, 0)).save(source, format="PNG")  # another picture
    rc, err = show(store, "--image", str(ok), "-o", str(tmp_path / "after.png"))
    assert rc == 2 and "changed since the run" in err and "--redo-changed" in err, err
    assert not (tmp_path / "after.png").exists()
    with serving(store) as srv:
        for what in ("overlay", "input", "grid"):
            code, body, _ = get(f"{srv.url}api/{what}/{ok}.png")
            assert code == 409, (what, code, body[:200])
            assert "changed since the run" in json.loads(body)["error"]
        assert get(f"{srv.url}api/map/{ok}.png")[0] == 200  # the map alone is still the store's


def test_a_damaged_store_file_is_one_line_and_costs_only_its_images(demo_store, tmp_path):
    store = copy_of_demo(demo_store, tmp_path)
    g = zarr.open_group(str(store), mode="r")
    status = np.asarray(g["status"][:])
    per_file = {}
    for name in ("cls_attention", "overlay"):
        arr = g[name]
        per_file[name] = (arr.shards or arr.chunks)[0]
        files = sorted(p for p in (store / name / "c").rglob("*") if p.is_file())
        assert len(files) >= 2, name
        damaged = files[-1]  # the last batch's
        damaged.write_bytes(damaged.read_bytes()[: max(1, damaged.stat().st_size // 3)])
    victim = int(np.flatnonzero(status == 1)[-1])
    rc, err = show(store, "--image", str(victim), "-o", str(tmp_path / "x.png"))
    assert rc == 2 and f"cannot read cls_attention of image {victim}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    query = "api/thumbs?offset=0&limit=60&box=64"
    with serving(demo_store) as srv:
        good = np.frombuffer(get(srv.url + query)[1], np.uint8).reshape(status.size, -1)
    with serving(store) as srv:
        code, body, _ = get(srv.url + query)
        assert code == 200
        tiles = np.frombuffer(body, np.uint8).reshape(status.size, -1)
        code, body, _ = get(f"{srv.url}api/map/{victim}.json")
        assert code == 500 and "cannot read cls_attention" in json.loads(body)["error"]
    last = (status.size - 1) // per_file["overlay"]
    intact = np.arange(status.size) // per_file["overlay"] != last
    assert intact.any() and not intact[victim]
    np.testing.assert_array_equal(tiles[intact], good[intact])
    assert (tiles[victim] != good[victim]).any()


def test_finished_images_whose_store_files_are_gone_are_failed_in_lists_and_summaries(
    demo_store, tmp_path
):
    # Their statistics and classes read as zarr's fill values: sorted first with 0.0, in the
    # summary's mean, counted as class 0, and `info` said ok with top-1 class 0.
    store = copy_of_demo(demo_store, tmp_path)
    g = zarr.open_group(str(store), mode="r")
    status = np.asarray(g["status"][:])
    entropy = np.asarray(g["cls_entropy"][:], np.float64)[:, -1].mean(-1)
    top1 = np.asarray(g["topk_index"][:, 0])
    per = g["cls_entropy"].chunks[0]
    for name in ("cls_entropy", "topk_index"):  # the first batch's files
        first = sorted(p for p in (store / name / "c").rglob("*") if p.is_file())[0]
        first.unlink()
    lost = np.arange(status.size) < per
    victim = int(np.flatnonzero(lost & (status == 1))[0])
    intact = np.flatnonzero(~lost & (status == 1))
    with serving(store) as srv:

        def answer(path: str) -> dict:
            code, body, _ = get(srv.url + path)
            assert code == 200, body
            return json.loads(body)

        info = answer(f"api/info/{victim}")  # before the status column is read: the page's
        assert info["status"] == "failed" and "store files are missing" in info["error"]
        assert "top1" not in info and "topk" not in info
        page = answer("api/list?limit=500&stat=cls_entropy&slayer=-1&shead=mean&sort=stat")
        order = intact[np.argsort(entropy[intact], kind="stable")]
        assert [item["i"] for item in page["items"]] == order.tolist()
        counts = answer("api/counts")
        assert counts["ok"] == intact.size
        assert counts["failed"] == int((status == 2).sum() + (lost & (status == 1)).sum())
        classes = {int(k): v for k, v in counts["classes"].items()}
        assert classes == {int(c): int((top1[intact] == c).sum()) for c in set(top1[intact])}
        summary = answer("api/summary")
        assert summary["n"] == intact.size
        item = next(
            i for i in answer("api/list?status=failed&limit=500")["items"] if i["i"] == victim
        )
        assert "cls_entropy" in item["error"] and "vit-attn run CONFIG" in item["error"]
        stats = answer(f"api/imagestats/{victim}")
        assert stats["status"] == "failed"
        code, body, _ = get(f"{srv.url}api/overlay/{victim}.png")
        assert code == 404 and "store files are missing" in json.loads(body)["error"]
    # the Python API: they read as failed, with a warning, so summaries leave them out
    from vit_attn import open_store
    from vit_attn.analysis import ok_images, summarise
    from vit_attn.store import StoreDamageWarning

    with pytest.warns(StoreDamageWarning, match=r"cls_entropy \(\d+ images: 0, "):
        ds = open_store(store)
    np.testing.assert_array_equal(ok_images(ds), intact)
    table = summarise(ds, ["cls_entropy"])
    layer = int(g["layer"][-1])
    want = np.asarray(g["cls_entropy"][:], np.float64)[intact, -1, :].mean(0)
    np.testing.assert_allclose(table.loc["cls_entropy"].loc[layer]["mean"].to_numpy(), want)


def test_a_missing_image_path_file_is_a_damaged_store_not_a_changed_input(demo_store, tmp_path):
    # Its fill value "" named the image folder itself, "changed since the run" (a folder's
    # size), and advised --redo-changed.
    store = copy_of_demo(demo_store, tmp_path)
    for f in (p for p in (store / "image_path" / "c").rglob("*") if p.is_file()):
        f.unlink()
    rc, err = show(store, "--image", "1", "-o", str(tmp_path / "x.png"))
    assert rc == 2 and "cannot read image_path of image 1: its store file is missing" in err, err
    assert "changed since the run" not in err


def test_a_missing_store_file_is_not_read_as_zeros(demo_store, tmp_path):
    # zarr reads an absent chunk as its fill value: zeros that look like a flat map.
    store = copy_of_demo(demo_store, tmp_path)
    status = np.asarray(zarr.open_group(str(store), mode="r")["status"][:])
    files = sorted(p for p in (store / "cls_attention" / "c").rglob("*") if p.is_file())
    files[0].unlink()  # the first batch's
    victim = int(np.flatnonzero(status == 1)[0])
    rc, err = show(store, "--image", str(victim), "-o", str(tmp_path / "x.png"))
    assert rc == 2 and "store file is missing although the image's status is 1" in err, err
    with serving(store) as srv:
        code, body, _ = get(f"{srv.url}api/map/{victim}.json")
        assert code == 500 and "store file is missing" in json.loads(body)["error"]
    # The same for the stored overlays behind a page of thumbnails: the first batch's tiles
    # are drawn as failed ones, not as black pictures; the others are unchanged.
    overlays = sorted(p for p in (store / "overlay" / "c").rglob("*") if p.is_file())
    overlays[0].unlink()
    per_batch = (
        zarr.open_group(str(store), mode="r")["overlay"].shards
        or zarr.open_group(str(store), mode="r")["overlay"].chunks
    )[0]
    query = "api/thumbs?offset=0&limit=60&box=64"
    with serving(demo_store) as srv:
        good = np.frombuffer(get(srv.url + query)[1], np.uint8).reshape(status.size, -1)
    with serving(store) as srv:
        code, body, _ = get(srv.url + query)
    tiles = np.frombuffer(body, np.uint8).reshape(status.size, -1)
    first = np.arange(status.size) < per_batch
    np.testing.assert_array_equal(tiles[~first], good[~first])
    for i in np.flatnonzero(first & (status == 1)):
        assert {tuple(x) for x in tiles[i].reshape(-1, 3).tolist()} == {FAILED_RGB}, i


def test_a_store_of_an_unknown_format_version_is_refused_by_every_reader(demo_store, tmp_path):
    store = tmp_path / "future.zarr"
    shutil.copytree(demo_store, store)
    zarr.open_group(str(store), mode="r+").attrs["format_version"] = 99
    with pytest.raises(StoreError, match="format_version 99"):
        open_store(store)
    with pytest.raises(StoreError, match="format_version 99"):
        make_server(store, "127.0.0.1", 0)
    show_it = ["show", str(store), "--image", "0", "-o", str(tmp_path / "x.png")]
    for command in (["inspect", str(store)], show_it):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert cli_main(command) == 2, command
        assert "format_version 99" in err.getvalue() and "Traceback" not in err.getvalue()


def test_every_loopback_address_is_this_machine_only(demo_store):
    from vit_attn.view.server import is_loopback

    for host in ("127.0.0.1", "127.0.0.2", "localhost", "LOCALHOST", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "192.168.1.4", "example.org", "::"):
        assert not is_loopback(host), host
    srv = make_server(demo_store, "127.0.0.2", 0)  # all of 127.0.0.0/8 is loopback on Linux
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        port = srv.server_address[1]
        with socket.create_connection(("127.0.0.2", port), timeout=30) as sock:
            sock.sendall(
                b"GET /api/meta HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
            )
            assert status_of(sock.recv(4096)) == 403  # DNS rebinding refused here too
        code, _, _ = get(f"http://127.0.0.2:{port}/api/meta")
        assert code == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_show_and_stats_output_mistakes_are_one_line_before_any_work(
    demo_store, tmp_path, capsys, monkeypatch
):
    rc, err = show(demo_store, "--image", "0", "-o", str(tmp_path / "x.jpg"))
    assert rc == 2 and "give a name ending in .png" in err and not (tmp_path / "x.jpg").exists()
    heads = len(zarr.open_group(str(demo_store), mode="r")["head"][:])
    assert show(demo_store, "--image", "0", "--head", "-1", "-o", str(tmp_path / "a.png"))[0] == 0
    assert (
        show(demo_store, "--image", "0", "--head", str(heads - 1), "-o", str(tmp_path / "b.png"))[0]
        == 0
    )
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    plots = tmp_path / "plots.jpg"
    plots.write_text("a file")
    capsys.readouterr()
    assert cli_main(["stats", str(demo_store), "--plots", str(plots)]) == 2
    out, err = capsys.readouterr()
    assert "is a file; give a folder" in err and out == ""  # no table printed first
    assert cli_main(["cache", "--dir", str(plots)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path))  # '~/x.png' quoted: the home, not a folder "~"
    assert show(demo_store, "--image", "0", "-o", "~/home.png")[0] == 0
    assert (tmp_path / "home.png").is_file() and not Path("~").exists()
    # A picture under a file, a picture that is a folder, plots inside the store: one line each.
    rc, err = show(demo_store, "--image", "0", "-o", str(plots / "x.png"))
    assert rc == 2 and f"{plots} is a file, not a folder" in err, err
    (tmp_path / "dir.png").mkdir()
    rc, err = show(demo_store, "--image", "0", "-o", str(tmp_path / "dir.png"))
    assert rc == 2 and "is a folder; give a file name" in err, err
    assert cli_main(["stats", str(demo_store), "--plots", str(demo_store / "plots")]) == 2
    assert "is inside the store" in capsys.readouterr().err
    assert not (demo_store / "plots").exists()
    rc, err = show(demo_store, "--image", "0", "-o", str(demo_store / "x.png"))
    assert rc == 2 and "is inside the store" in err
    rc, err = show(f"file://{demo_store}", "--image", "0", "-o", str(demo_store / "y.png"))  # type: ignore[arg-type]
    assert rc == 2 and "is inside the store" in err, err


# --------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser():
    executable = chromium_executable()
    if executable is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.errors = errors
    yield pg
    context.close()


def wait(pg, condition: str, timeout: float = 60.0) -> None:
    """Poll a JavaScript condition (page.evaluate runs outside the page's CSP, which forbids
    the eval that wait_for_function would need)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pg.evaluate(f"() => Boolean({condition})"):
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {condition}; page errors: {pg.errors}")


def ready(pg, view: str, extra: str = "true") -> None:
    wait(
        pg,
        f"document.body.dataset.state === 'ready' && document.body.dataset.view === '{view}' && ({extra})",
    )


READ_IMG = """(sel) => {
  const img = document.querySelector(sel);
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d');
  ctx.drawImage(img, 0, 0);
  return [c.width, c.height, Array.from(ctx.getImageData(0, 0, c.width, c.height).data)];
}"""
READ_CANVAS = """(sel) => {
  const c = document.querySelector(sel);
  return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];
}"""


def pixels(pg, script: str, selector: str) -> np.ndarray:
    w, h, data = pg.evaluate(script, selector)
    return np.asarray(data, np.uint8).reshape(h, w, 4)[..., :3]


def test_browser_grid_filters_and_thumbnails(server, demo_store, page):
    g = zarr.open_group(str(demo_store), mode="r")
    status, top1 = g["status"][:], g["topk_index"][:, 0]
    # A small window: 2 tiles are in view (asked for first), the rest come in later parts.
    page.set_viewport_size({"width": 400, "height": 300})
    page.goto(server.url)
    ready(page, "grid-painted")
    assert page.locator("#tiles .tile").count() == status.size
    assert page.locator("#page-info").get_attribute("data-total") == str(status.size)
    # thumbnails are the stored overlays (64 px: shown at their own resolution), every one
    for i in np.flatnonzero(status == 1):
        got = pixels(page, READ_CANVAS, f'#tiles .tile[data-i="{i}"] canvas')
        np.testing.assert_array_equal(got, g["overlay"][i])
    failed_tile = pixels(page, READ_CANVAS, "#tiles .tile.failed canvas")
    assert (failed_tile == [120, 30, 30]).all()
    page.set_viewport_size({"width": 1280, "height": 900})
    # status filter: the failed image with its error
    page.select_option("#f-status", "failed")
    ready(page, "grid-painted", "document.querySelector('#page-info').dataset.total === '1'")
    assert "not an image" in page.locator("#tiles .tile.failed .error").inner_text()
    # class filter
    page.select_option("#f-status", "all")
    wait(page, f"document.querySelector('#page-info').dataset.total === '{status.size}'")
    page.select_option("#f-top1", "2")
    n2 = int(((top1 == 2) & (status == 1)).sum())
    ready(page, "grid-painted", f"document.querySelector('#page-info').dataset.total === '{n2}'")
    page.select_option("#f-top1", "")
    # statistic range + sort by it
    entropy = np.asarray(g["cls_entropy"][:], np.float64)[:, -1].mean(-1)
    ok = np.flatnonzero(status == 1)
    lo = float(np.quantile(entropy[ok], 0.5))
    page.select_option("#f-stat", "cls_entropy")
    wait(page, "!document.querySelector('#f-min').disabled")
    page.fill("#f-min", f"{lo}")
    page.dispatch_event("#f-min", "change")
    want = [int(i) for i in ok if entropy[i] >= lo]
    ready(
        page,
        "grid-painted",
        f"document.querySelector('#page-info').dataset.total === '{len(want)}'",
    )
    page.select_option("#f-sort", "stat:desc")
    first = int(max(want, key=lambda i: entropy[i]))
    ready(page, "grid-painted", f"document.querySelector('#tiles .tile').dataset.i === '{first}'")
    shown = [
        int(x) for x in page.eval_on_selector_all("#tiles .tile", "ts => ts.map(t => t.dataset.i)")
    ]
    assert shown == sorted(want, key=lambda i: -entropy[i])
    assert not page.errors, page.errors


def test_browser_image_view_selectors_and_patch_rows(server, demo_store, page):
    g = zarr.open_group(str(demo_store), mode="r")
    cmap = colormap_of(demo_store)
    prefix = g.attrs["model"]["num_prefix_tokens"]
    gh, gw = g.attrs["model"]["grid"]
    page.goto(server.url + "#/grid?status=ok")
    ready(page, "grid-painted")
    page.locator('#tiles .tile[data-i="4"]').click()
    ready(page, "image-ready")
    assert page.locator("#img-title").inner_text().startswith("#4 ")
    cls = np.asarray(g["cls_attention"][4], np.float64)
    assert_map_matches(pixels(page, READ_IMG, "#p-map"), cls[-1].mean(0), cmap)
    # this image's statistics (loaded after the view is ready): the stored values
    wait(page, "document.querySelectorAll('#img-stats tbody tr').length > 0")
    entropy_row = page.locator("#img-stats tbody tr").first
    assert entropy_row.locator("th").inner_text().startswith("cls_entropy")
    shown_entropy = [float(t) for t in entropy_row.locator("td").all_inner_texts()]
    np.testing.assert_allclose(shown_entropy, g["cls_entropy"][4, -1], rtol=5e-3)
    # layer and head selectors change the map
    page.select_option("#m-layer", "1")
    ready(page, "image-ready", "document.body.dataset.map.includes('layer=1&head=mean')")
    assert_map_matches(pixels(page, READ_IMG, "#p-map"), cls[1].mean(0), cmap)
    page.select_option("#m-head", "2")
    ready(page, "image-ready", "document.body.dataset.map.includes('layer=1&head=2')")
    assert_map_matches(pixels(page, READ_IMG, "#p-map"), cls[1, 2], cmap)
    # clicking patch (r, c) of the shown map shows that token's row
    r, c = 2, 5
    box = page.locator("#map-box").bounding_box()
    page.mouse.click(
        box["x"] + (c + 0.5) * box["width"] / gw, box["y"] + (r + 0.5) * box["height"] / gh
    )
    token = prefix + r * gw + c
    ready(
        page,
        "image-ready",
        f"document.body.dataset.map.includes('source=row') && document.body.dataset.map.includes('token={token}')",
    )
    att = np.asarray(g["attention"][4], np.float64)
    assert_map_matches(
        pixels(page, READ_IMG, "#p-map"), att[1, 2, token, prefix:].reshape(gh, gw), cmap
    )
    assert page.locator("#map-marker").is_visible()
    # CLS as a token, then the diagonal
    page.select_option("#m-token", "0")
    ready(page, "image-ready", "document.body.dataset.map.includes('token=0')")
    assert_map_matches(
        pixels(page, READ_IMG, "#p-map"), att[1, 2, 0, prefix:].reshape(gh, gw), cmap
    )
    page.select_option("#m-source", "diag")
    ready(page, "image-ready", "document.body.dataset.map.includes('source=diag')")
    diag = np.diagonal(att[1, 2, prefix:, prefix:]).reshape(gh, gw)
    assert_map_matches(pixels(page, READ_IMG, "#p-map"), diag, cmap)
    # the mask slider outlines the mass-threshold patches on the overlay
    before = pixels(page, READ_IMG, "#p-overlay")
    page.locator("#m-mask").fill("0.5")
    ready(page, "image-ready", "document.body.dataset.shown.includes('mask=0.5')")
    wait(page, "document.querySelector('#map-readout').textContent.includes('patches hold 0.5')")
    after = pixels(page, READ_IMG, "#p-overlay")
    outline = (after == [0, 255, 255]).all(-1)
    assert outline.any() and not (before == [0, 255, 255]).all(-1).any()
    # prev / next walk the current filter (status=ok skips the failed image)
    status = g["status"][:]
    ok = np.flatnonzero(status == 1)
    nxt = int(ok[np.searchsorted(ok, 4) + 1])
    page.click("#img-next")
    ready(page, "image-ready", f"document.body.dataset.shown.startsWith('#/image/{nxt}?')")
    assert page.locator("#img-title").inner_text().startswith(f"#{nxt} ")
    # the head grid: a tile click picks the head
    page.goto(server.url + "#/image/4?layer=3")
    ready(page, "image-ready")
    wait(
        page,
        "document.querySelector('#p-grid').complete && document.querySelector('#p-grid').naturalWidth > 0",
    )
    gbox = page.locator("#p-grid").bounding_box()
    page.mouse.click(
        gbox["x"] + gbox["width"] * 0.75, gbox["y"] + gbox["height"] * 0.25
    )  # tile 1 = head 0
    ready(page, "image-ready", "document.body.dataset.map.includes('layer=3&head=0')")
    assert_map_matches(pixels(page, READ_IMG, "#p-map"), cls[3, 0], cmap)
    assert not page.errors, page.errors


def test_browser_failed_image_and_statistics(server, demo_store, page):
    g = zarr.open_group(str(demo_store), mode="r")
    status = g["status"][:]
    failed = int(np.flatnonzero(status == 2)[0])
    page.goto(server.url + f"#/image/{failed}")
    ready(page, "image-ready")
    assert "not an image" in page.locator("#img-error").inner_text()
    # Its overlay and map were asked for with the facts and answered 404: broken pictures
    # and console errors. They are asked for only once the facts say the image has them.
    assert not page.errors, page.errors
    for pic in ("#p-overlay", "#p-map", "#p-grid"):
        assert page.locator(pic).get_attribute("src") is None, pic
    # An image that does not exist kept the previous one's "6 of 18" and prev / next.
    page.goto(server.url + f"#/image/{int(np.flatnonzero(status == 1)[3])}")
    ready(page, "image-ready", "document.querySelector('#img-position').textContent !== ''")
    page.goto(server.url + f"#/image/{status.size + 100}")
    ready(page, "image-ready", "document.querySelector('#img-position').textContent === ''")
    assert page.locator("#img-prev").is_disabled() and page.locator("#img-next").is_disabled()
    page.errors.clear()  # the missing image's own 404s
    # statistics: one dot per (layer, head); a dot lists its most extreme images
    page.goto(server.url + "#/stats?stat=attention_distance")
    ready(page, "stats-ready")
    n_layers, n_heads = g["layer"].shape[0], g["head"].shape[0]
    assert page.locator("#plot circle.dot").count() == n_layers * n_heads
    page.locator('#plot circle.dot[data-layer="2"][data-head="1"]').click()
    ready(page, "stats-ready", "document.querySelectorAll('#extremes .tile').length > 0")
    dist = np.asarray(g["attention_distance"][:, 2, 1], np.float64)
    ok = np.flatnonzero(status == 1)
    highest = int(ok[np.argmax(dist[ok])])
    lowest = int(ok[np.argmin(dist[ok])])
    rows = page.locator("#extremes .tiles-row")
    assert rows.nth(0).locator(".tile").first.get_attribute("data-i") == str(highest)
    assert rows.nth(1).locator(".tile").first.get_attribute("data-i") == str(lowest)
    # the per-head table: the dataset mean over ok images
    cell = page.locator("#stats-table tbody tr").nth(2).locator("td").nth(1).inner_text()
    assert float(cell.split(" ")[0]) == pytest.approx(dist[ok].mean(), rel=5e-3)
    assert not page.errors, page.errors


def test_browser_store_without_full_attention_or_class_token(tmp_path, browser):
    store = handmade_store(tmp_path / "pool.zarr", "pool_attention")
    maps = np.asarray(zarr.open_group(str(store), mode="r")["pool_attention"][:], np.float64)
    srv = make_server(store, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    context = browser.new_context()
    pg = context.new_page()
    pg.errors = []
    try:
        pg.goto(srv.url)
        ready(pg, "grid-painted")
        assert pg.locator("#tiles .tile").count() == 5
        pg.goto(srv.url + "#/image/3?head=1")
        ready(pg, "image-ready")
        assert "attention.full: true" in pg.locator("#row-hint").inner_text()
        assert pg.locator("#m-layer").is_disabled()
        assert_map_matches(pixels(pg, READ_IMG, "#p-map"), maps[3, 1], "inferno")
        pg.goto(srv.url + "#/stats")
        ready(pg, "stats-ready")
        assert "attention.stats: true" in pg.locator("#stats-error").inner_text()
    finally:
        context.close()
        srv.shutdown()
        srv.server_close()


def test_browser_pool_with_its_own_head_count(tmp_path, page):
    """An attention pool with 5 heads over blocks of 2: the head menu lists the pool's heads
    for its map, and head 4 draws the pool's head 4."""
    store = handmade_store(tmp_path / "pool5.zarr", "pool_attention", pool_heads=5)
    maps = np.asarray(zarr.open_group(str(store), mode="r")["pool_attention"][:], np.float64)
    srv = make_server(store, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        meta = json.loads(get(srv.url + "api/meta")[1])
        assert meta["heads"] == [0, 1] and meta["sources"][0]["head_count"] == 5
        page.goto(srv.url + "#/image/3?head=4")
        ready(page, "image-ready")
        options = page.locator("#m-head option").all_inner_texts()
        assert options == ["mean", "max", "min", *[f"head {h}" for h in range(5)]]
        assert page.locator("#m-head").input_value() == "4"
        assert_map_matches(pixels(page, READ_IMG, "#p-map"), maps[3, 4], "inferno")
        assert not page.errors, page.errors
    finally:
        srv.shutdown()
        srv.server_close()


def test_browser_says_why_a_picture_is_refused(demo_store, tmp_path, page):
    # The overlay of an image whose source changed since the run is refused (409); the page
    # shows the server's reason, not "could not load <url>".
    store = copy_of_demo(demo_store, tmp_path)
    g = zarr.open_group(str(store), mode="r")
    ok = int(np.flatnonzero(np.asarray(g["status"][:]) == 1)[0])
    source = Path(g.attrs["image_root"]) / str(g["image_path"][ok])
    Image.new("RGB", (64, 48), (0, 200, 0)).save(source, format="PNG")
    with serving(store) as srv:
        page.goto(srv.url + f"#/image/{ok}")
        ready(page, "image-ready")
        shown = page.locator("#img-error").inner_text()
    assert "changed since the run" in shown and "--redo-changed" in shown, shown
