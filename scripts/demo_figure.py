"""Build the README picture (docs/demo_overlays.png) from a `make demo` output folder.

The stored head-mean overlays of the first generated shapes and two photographs, enlarged
without smoothing (nearest neighbour, so the patch grid stays visible), in a grid.

Usage: ``.venv/bin/python scripts/demo_figure.py [--out-dir demo_out] [-o docs/demo_overlays.png]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("photos/astronaut.png", "photos/chelsea.png")


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out-dir", type=Path, default=ROOT / "demo_out", help="the folder `make demo` wrote"
    )
    p.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "demo_overlays.png")
    p.add_argument(
        "--shapes", type=int, default=6, help="generated images to show, first ones first"
    )
    p.add_argument("--size", type=int, default=192, help="tile side in pixels")
    p.add_argument("--columns", type=int, default=4)
    args = p.parse_args(argv)

    png = args.out_dir / "png"
    shapes = sorted(png.glob("img_*.png.png"))[: args.shapes]
    photos = [png / f"{name}.png" for name in PHOTOS if (png / f"{name}.png").is_file()]
    tiles = [
        Image.open(f).convert("RGB").resize((args.size, args.size), Image.NEAREST)
        for f in shapes + photos
    ]
    if not tiles:
        raise SystemExit(f"no overlays under {png}: run `make demo` first")
    gap = 4
    rows = -(-len(tiles) // args.columns)
    sheet = Image.new(
        "RGB", (args.columns * (args.size + gap) - gap, rows * (args.size + gap) - gap), "white"
    )
    for i, tile in enumerate(tiles):
        r, c = divmod(i, args.columns)
        sheet.paste(tile, (c * (args.size + gap), r * (args.size + gap)))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.output, optimize=True)
    print(f"wrote {args.output} ({len(shapes)} shapes, {len(photos)} photographs)")
    return args.output


if __name__ == "__main__":
    main()
