"""`vit-attn demo`: generate the demo images, add a few bundled photographs, run the demo config.

Works offline and from an installed wheel: the demo ViT and its config ship as package data
(`vit_attn/demo/assets/`), the images are drawn here, and the photographs come from
scikit-image's bundled data when it is installed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from ..argparsing import OneLineParser
from ..cli import main as cli_main
from ..config import load_config
from ..errors import ConfigError
from .shapes import generate

ASSETS = Path(__file__).resolve().parent / "assets"
CONFIG = ASSETS / "demo.yaml"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")


def add_photos(folder: Path) -> int:
    """Copy scikit-image's bundled photographs as PNG; none if scikit-image is missing."""
    try:
        from PIL import Image
        from skimage import data
    except ImportError:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        target = folder / f"{name}.png"
        if not target.exists():
            Image.fromarray(getattr(data, name)()).save(target)
    return len(PHOTOS)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="vit-attn demo", description=__doc__)
    p.add_argument(
        "--config", type=Path, default=CONFIG, help="the run's config (default: the bundled one)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("demo_out"), help="output folder (default: ./demo_out)"
    )
    p.add_argument("--n", type=int, default=48, help="generated images (default 48)")
    p.add_argument("--seed", type=int, default=2026, help="their random seed (default 2026)")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="delete the previous demo output first (only what the demo wrote: its images, "
        "then the store and PNGs as `run --overwrite` does)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="as vit-attn -v")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides for `vit-attn run` (repeatable)",
    )
    args = p.parse_args(argv)
    problem = _refusal(args)
    if problem:  # before any image is drawn
        print(f"vit-attn: error: {problem}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    overrides = [
        f"data.source={out / 'shapes' / 'images'}",
        f"output.store={out / 'demo.zarr'}",
        f"output.png_dir={out / 'png'}",
        *args.set,
    ]
    if str(args.config) != "-":  # a --set mistake is said before any image is drawn
        try:
            load_config(args.config, overrides)
        except ConfigError as exc:
            print(f"vit-attn: error: {exc}", file=sys.stderr)
            return 2
    if args.fresh:
        problem = clear_generated(args.out / "shapes")
        if problem:
            print(f"vit-attn: error: --fresh: {problem}", file=sys.stderr)
            return 2
    generate(args.out / "shapes", args.n, seed=args.seed)
    photos = add_photos(args.out / "shapes" / "images" / "photos")
    print(
        f"demo: {args.n} generated images (masks in {args.out / 'shapes' / 'masks'}), {photos} photographs",
        file=sys.stderr,
    )
    cmd = ["-v"] * args.verbose + ["run", str(args.config)]
    cmd += [x for o in overrides for x in ("--set", o)]
    if args.fresh:  # the store and its PNGs go as `run --overwrite` lets them: ours only
        cmd.append("--overwrite")
    if not sys.stderr.isatty():
        cmd.append("--no-progress")
    rc = cli_main(cmd)
    if rc == 0:
        exe = command_name()
        print(
            f"\ndemo: look at {out / 'png'} (overlays; *.heads.png = all heads),\n"
            f"      inspect the store with: {exe} inspect {out / 'demo.zarr'}\n"
            f"      or in Python: import vit_attn; vit_attn.open_store('{out / 'demo.zarr'}')\n"
            f"      browse it in a web browser with:\n\n"
            f"    {exe} view {out / 'demo.zarr'}\n",
            file=sys.stderr,
        )
    return rc


_GENERATED = re.compile(r"(images|masks)/img_\d+\.png|labels\.csv")
_PHOTO_FILES = {f"images/photos/{name}.png" for name in PHOTOS}


def clear_generated(shapes: Path) -> str | None:
    """Delete the images an earlier demo drew under `shapes` (a larger `--n` left more), or
    say why not: `--out` may be any folder, so a file the demo does not write (or a link)
    means the folder is not only the demo's, and nothing is deleted."""
    if not shapes.exists() and not shapes.is_symlink():
        return None
    if shapes.is_symlink() or not shapes.is_dir():
        return f"{shapes} is not a folder the demo made; move it or give another --out"
    for path in sorted(shapes.rglob("*")):
        rel = path.relative_to(shapes).as_posix()
        if path.is_symlink() or (
            path.is_file() and not (_GENERATED.fullmatch(rel) or rel in _PHOTO_FILES)
        ):
            return (
                f"{shapes} holds {rel}, which the demo did not write; nothing was deleted "
                "(move it, or give another --out)"
            )
    shutil.rmtree(shapes)
    return None


def _refusal(args: argparse.Namespace) -> str | None:
    if args.n < 1:
        return f"--n {args.n}: give the number of images to draw (at least 1)"
    if not 0 <= args.seed < 2**32:
        return f"--seed {args.seed}: give a seed in 0..{2**32 - 1}"
    if args.out.exists() and not args.out.is_dir():
        return f"--out {args.out} is a file; give a folder"
    if str(args.config) != "-" and not args.config.is_file():
        return f"--config {args.config} is not a file; give the run's YAML config"
    return None


def command_name() -> str:
    """How to type `vit-attn` in this shell: the bare name when PATH finds this install's
    script, else its path (`.venv/bin/vit-attn` after `make demo`), so printed commands run
    when pasted."""
    script = Path(sys.executable).parent / "vit-attn"
    found = shutil.which("vit-attn")
    if not script.exists() or (found and Path(found).resolve() == script.resolve()):
        return "vit-attn"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


if __name__ == "__main__":
    sys.exit(main())
