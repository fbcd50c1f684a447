"""`vit-attn view` speed, measured by the browser: first grid paint and one image view.

Builds stores with `vit_attn.store` (ViT-B/16 layout: 224 px input, 14 x 14 grid, 12 heads,
last block stored, 7 statistics, top-5, head-mean overlays, batches of 64), one of
`--images` images and one of 50 with the same layout, with JPEG source files on disk (the
demo shapes drawn at 320 x 240, reused round-robin) so the image view re-decodes a real file.
Attention maps are smooth random blobs, overlays are `overlay.blend` of those over the
images. Then `vit-attn view` runs as its own process and headless Chromium (Debian's
`chromium`, through Playwright) loads the page.

Timings come from the page's Performance API:
- first grid paint: `performance.mark('grid-visible')` (set when the tiles that fit in the
  1280 x 900 window, 8 x 4 here, are drawn with their captions and thumbnails) relative to
  navigation start, on a fresh page; "cold" is the first load after the server started
  (server caches empty), "warm" the median of later loads (thumbnails then come from the
  server's memory); also `grid-painted` (all 60 tiles of the page) and DOMContentLoaded
  (the page's own HTML/CSS/JS, no data: the browser's share);
- image view: from a mark set just before the page's hash changes to `#/image/I` to the
  `image-ready` mark (facts, image, overlay, map and its values loaded and shown), for
  images never opened before, median and max; each view is let finish (head grid and
  statistics table, which load after the ready mark) plus 0.3 s before the next.

    .venv/bin/python benchmarks/view.py --images 10000 --workdir /tmp/view-bench
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GRID, HEADS, INPUT, PATCH, BATCH = (14, 14), 12, (224, 224), (16, 16), 64


def source_images(folder: Path, n: int) -> list[str]:
    from vit_attn.demo.shapes import render_index

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"src_{i:03d}.jpg"
        if not (folder / name).exists():
            render_index(11, i).image.resize((320, 240)).convert("RGB").save(
                folder / name, quality=90
            )
        names.append(name)
    return names


def build_store(path: Path, n_images: int, sources: list[str], root: Path) -> None:
    from vit_attn.decode import Preprocess, load_image
    from vit_attn.overlay import blend
    from vit_attn.stats import STAT_NAMES, STAT_UNITS
    from vit_attn.store import (
        STATUS_FAILED,
        StoreSpec,
        consolidate,
        create_store,
        empty_batch,
        write_batch,
    )

    if (path / "zarr.json").exists():
        return
    spec = StoreSpec(
        n_images=n_images,
        batch_size=BATCH,
        layers=(11,),
        num_heads=HEADS,
        grid=GRID,
        input_size=INPUT,
        num_tokens=1 + GRID[0] * GRID[1],
        topk=5,
        full_attention=False,
        rollout=False,
        overlays="mean",
        stats=STAT_NAMES,
    )
    prep = Preprocess(input_size=INPUT)
    attrs = {
        "model": {
            "name": "vit_base_patch16_224 (synthetic maps)",
            "depth": 12,
            "num_heads": HEADS,
            "num_prefix_tokens": 1,
            "grid": list(GRID),
            "patch_size": list(PATCH),
            "input_size": [3, *INPUT],
            "num_classes": 1000,
        },
        "preprocess": prep.to_dict(),
        "image_root": str(root),
        "stat_units": dict(STAT_UNITS),
        "config": {"output": {"overlay_alpha": 0.5, "colormap": "inferno"}},
    }
    paths = [sources[i % len(sources)] for i in range(n_images)]
    create_store(path, spec, paths, attrs, overwrite=True)
    decoded = {name: load_image(root / name, prep) for name in sources}
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : GRID[0], 0 : GRID[1]]
    for b in range(spec.n_batches):
        result = empty_batch(spec, b)
        n = result.stop - result.start
        centre = rng.uniform(0, 14, size=(n, HEADS, 2, 1, 1))
        width = rng.uniform(1.5, 5.0, size=(n, HEADS, 1, 1))
        logits = -((yy - centre[:, :, 0]) ** 2 + (xx - centre[:, :, 1]) ** 2) / (2 * width**2)
        maps = np.exp(logits)
        maps = 0.9 * maps / maps.sum(axis=(-2, -1), keepdims=True)
        result.arrays["cls_attention"][:, 0] = maps
        images = np.stack([decoded[paths[i]] for i in range(result.start, result.stop)])
        result.arrays["overlay"][:] = blend(images, maps.mean(1))
        for name in STAT_NAMES:
            result.arrays[name][:] = rng.gamma(2.0, 1.0, size=(n, 1, HEADS))
        result.arrays["topk_index"][:] = rng.integers(0, 1000, size=(n, 5))
        result.arrays["topk_prob"][:] = np.sort(rng.dirichlet(np.ones(6), size=n)[:, :5], 1)[
            :, ::-1
        ]
        result.status[:] = 1
        if b == 1:  # a few failures, as real runs have
            result.status[:3] = STATUS_FAILED
            result.error[:3] = ["not an image, or a format Pillow cannot read"] * 3
            for name in result.arrays:
                result.arrays[name][:3] = 0
        write_batch(path, result)
    consolidate(path)


def start_view(store: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vit_attn.cli", "view", str(store), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = proc.stderr.readline()
    m = re.search(r"at (http://\S+/)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"vit-attn view did not start: {line}")
    return proc, m.group(1)


def wait(page, condition: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.evaluate(f"() => Boolean({condition})"):
            return
        time.sleep(0.01)
    raise TimeoutError(condition)


def last_mark(page, name: str) -> float:
    return page.evaluate(f"() => performance.getEntriesByName('{name}').at(-1).startTime")


def measure(browser, url: str, n_images: int, loads: int, views: int) -> dict:
    grid, whole, dcl = [], [], []
    for _ in range(loads):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.goto(url)
        wait(page, "document.body.dataset.view === 'grid-painted'")
        grid.append(last_mark(page, "grid-visible"))
        whole.append(last_mark(page, "grid-painted"))
        dcl.append(
            page.evaluate(
                "() => performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd"
            )
        )
        context.close()
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(url)
    wait(page, "document.body.dataset.view === 'grid-painted'")
    rng = np.random.default_rng(1)
    opened = []
    for i in rng.choice(n_images, size=min(views, n_images), replace=False):
        page.evaluate(f"() => {{ performance.mark('open'); location.hash = '#/image/{int(i)}'; }}")
        # `shown` is the hash the page last finished drawing (set with the ready mark)
        wait(page, f"document.body.dataset.shown === '#/image/{int(i)}'")
        opened.append(last_mark(page, "image-ready") - last_mark(page, "open"))
        # let the view finish (head grid, statistics table) before the next one, as a person would
        wait(
            page,
            "document.querySelector('#p-grid').complete && document.querySelector('#img-stats tr')",
        )
        time.sleep(0.3)
    context.close()
    return {
        "grid_cold_ms": round(grid[0], 1),
        "grid_warm_median_ms": round(statistics.median(grid[1:]), 1) if len(grid) > 1 else None,
        "page_of_60_cold_ms": round(whole[0], 1),
        "page_of_60_warm_median_ms": round(statistics.median(whole[1:]), 1)
        if len(whole) > 1
        else None,
        "dom_content_loaded_median_ms": round(statistics.median(dcl), 1),
        "image_median_ms": round(statistics.median(opened), 1) if opened else None,
        "image_max_ms": round(max(opened), 1) if opened else None,
        "image_views": len(opened),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--small", type=int, default=50, help="images of the small store")
    p.add_argument("--loads", type=int, default=6, help="page loads per store (first one cold)")
    p.add_argument("--views", type=int, default=20, help="image views per store")
    p.add_argument("--workdir", type=Path, default=Path("view-bench"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    from vit_attn.view.headless import CHROMIUM_ARGS, chromium_executable

    sources = source_images(args.workdir / "images", 64)
    results = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium_executable(), args=list(CHROMIUM_ARGS)
        )
        for n in (args.small, args.images):
            store = args.workdir / f"store_{n}.zarr"
            t0 = time.perf_counter()
            build_store(store, n, sources, args.workdir / "images")
            print(f"store of {n} images ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            proc, url = start_view(store)
            try:
                results[n] = measure(browser, url, n, args.loads, args.views)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            print(n, results[n], file=sys.stderr)
        browser.close()
    results["load_average"] = [round(v, 2) for v in os.getloadavg()]
    results["cpus"] = os.cpu_count()
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
