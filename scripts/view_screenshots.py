"""Screenshots of `vit-attn view` for the README and docs/ (headless Debian chromium).

    .venv/bin/vit-attn demo --out demo_full --set attention.full=true
    .venv/bin/python scripts/view_screenshots.py demo_full/demo.zarr --out docs

Writes view_grid.png (the dataset grid, sorted by CLS entropy), view_image.png (one image:
a patch's attention row with the mass mask) and view_stats.png (attention distance by block).
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from vit_attn.view import make_server
from vit_attn.view.headless import CHROMIUM_ARGS, chromium_executable


def wait(page, condition: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.evaluate(f"() => Boolean({condition})"):
            return
        time.sleep(0.05)
    raise TimeoutError(condition)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("store", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--image", type=int, default=3)
    p.add_argument("--token", type=int, default=28, help="query token of the row shown")
    args = p.parse_args()
    server = make_server(args.store, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    shots = [
        (
            "view_grid.png",
            "#/grid?status=all&stat=cls_entropy&slayer=-1&shead=mean&sort=stat&order=asc",
            "grid-painted",
            False,
        ),
        (
            "view_image.png",
            f"#/image/{args.image}?source=row&layer=5&head=mean&token={args.token}&mask=0.6",
            "image-ready",
            True,
        ),
        ("view_stats.png", "#/stats?stat=attention_distance&slayer=5&shead=0", "stats-ready", True),
    ]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium_executable(), args=list(CHROMIUM_ARGS)
        )
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        for name, route, ready, full in shots:
            page.goto(server.url + route)
            wait(
                page,
                f"document.body.dataset.view === '{ready}' && document.body.dataset.state === 'ready'",
            )
            wait(page, "Array.from(document.images).every((i) => i.complete)")
            time.sleep(0.5)  # the head grid and tables fill in after the ready mark
            page.screenshot(path=str(args.out / name), full_page=full)
            print(args.out / name)
        browser.close()
    server.shutdown()


if __name__ == "__main__":
    main()
