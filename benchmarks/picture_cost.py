"""What the pictures cost per image, on the CPU: overlays blended in the graph vs numpy, and
encoding the PNGs `output.png_dir` writes.

- the same vit_tiny_patch16_224 graph (random init, seed 0, last block's CLS maps, uint8
  input) exported without overlays and with per-head overlays (`overlays: heads`), run on one
  onnxruntime thread, batch 32, rounds interleaved: CPU time per image (`time.process_time`);
- numpy's `overlay.blend` of the same head-mean and per-head overlays on the host (what
  `task.py` did before the graph blended them);
- PNG encoding of one image's overlay and of its head grid (`overlay.tile_grid`): Pillow at
  zlib level 1 (what `outputs.write_png` used first), `vit_attn.pngencode` with zlib (its
  fallback) and with ISA-L (its default), with the bytes each produces; and `tile_grid`
  itself (tiles and labels, before encoding), against labels drawn by Pillow on every grid.

Images: generated PNGs (240-320 px, benchmarks/imagesets.py) decoded as a run decodes them.

    python benchmarks/picture_cost.py --rounds 5
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "pipeline"))
sys.path.insert(0, str(HERE))

from imagesets import make_folder  # noqa: E402


def pillow_labels(grid, labels, n_tiles: int, h: int, w: int, border: int = 2):
    """What `overlay.tile_grid` did before its labels were stamped: Pillow draws each label
    box and text on every grid."""
    import math

    from PIL import Image, ImageDraw, ImageFont

    ncols = math.ceil(math.sqrt(n_tiles))
    canvas = Image.fromarray(grid)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, label in enumerate(labels):
        r, c = divmod(i, ncols)
        x0, y0 = border + c * (w + border) + 2, border + r * (h + border) + 2
        left, top, right, bottom = draw.textbbox((x0, y0), label, font=font)
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(0, 0, 0))
        draw.text((x0, y0), label, fill=(255, 255, 255), font=font)
    return np.array(canvas)


def cpu_ms_per_image(fn, n_images: int) -> float:
    t = time.process_time()
    fn()
    return (time.process_time() - t) * 1000 / n_images


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vit-attn-pict")
    args = p.parse_args(argv)

    from PIL import Image

    from vit_attn import pngencode
    from vit_attn.decode import load_batch, preprocess_for_model
    from vit_attn.export import export_onnx
    from vit_attn.graphinput import GraphInput
    from vit_attn.model import load_model
    from vit_attn.overlay import blend, head_labels, tile_grid
    from vit_attn.pngencode import encode_png
    from vit_attn.runtime import OrtRunner, RuntimeOptions
    from vit_attn.specs import ModelSource, OutputSpec
    from vit_attn.task import overlay_maps

    loaded = load_model(ModelSource("vit_tiny_patch16_224", seed=0))
    prep = preprocess_for_model(loaded.model, loaded.layout.input_size)
    pixels = GraphInput.pixels(prep.mean, prep.std)
    last = (loaded.layout.depth - 1,)
    graphs = {
        name: OrtRunner(
            export_onnx(loaded, OutputSpec(layers=last, logits=False, topk=0, **kw), "fp32",
                        args.workdir / "cache", pixels),
            RuntimeOptions(threads=1),
        )
        for name, kw in (("no overlays", {}), ("per-head overlays", {"overlays": "heads"}))
    }  # fmt: skip
    folder = make_folder(args.workdir / "png", args.batch, "png")
    u8 = load_batch(sorted(folder.iterdir()), prep)[0]
    outs = graphs["per-head overlays"].run(u8)
    stored = {"cls_attention": outs["cls_attention"].astype(np.float16)}
    heads = overlay_maps(stored)
    n, nh = heads.shape[:2]

    def numpy_blend() -> None:
        blend(u8, heads.mean(axis=1))
        blend(np.repeat(u8, nh, 0), heads.reshape(n * nh, *heads.shape[2:]))

    def pillow(picture: np.ndarray) -> int:
        buf = io.BytesIO()
        Image.fromarray(picture).save(buf, format="PNG", compress_level=1)
        return len(buf.getvalue())

    def ours(deflate: str):
        def encode(picture: np.ndarray) -> int:
            pngencode.DEFLATE = deflate
            return len(encode_png(picture))

        return encode

    grids = [
        tile_grid(np.concatenate([outs["overlay"][i][None], outs["overlay_heads"][i]]),
                  head_labels(nh))
        for i in range(n)
    ]  # fmt: skip
    cases = {
        **{f"graph, {name}": (lambda r=r: r.run(u8)) for name, r in graphs.items()},
        "numpy blend (mean + per head)": numpy_blend,
        "tile_grid (tiles + labels)": lambda: [
            tile_grid(np.concatenate([outs["overlay"][i][None], outs["overlay_heads"][i]]),
                      head_labels(nh))
            for i in range(n)
        ],
        "tile_grid, labels drawn by Pillow on every grid (before)": lambda: [
            pillow_labels(
                tile_grid(np.concatenate([outs["overlay"][i][None], outs["overlay_heads"][i]]),
                          head_labels(nh), titles=False),
                head_labels(nh), nh + 1, *outs["overlay"].shape[1:3],
            )
            for i in range(n)
        ],
    }  # fmt: skip
    grid_name = f"head grid {grids[0].shape[1]}x{grids[0].shape[0]}"
    pictures = {"overlay 224x224": list(outs["overlay"]), grid_name: grids}
    sizes = {}
    for what, pics in pictures.items():
        encoders = (
            ("Pillow level 1", pillow),
            ("pngencode, zlib", ours("zlib")),
            ("pngencode, isal", ours("isal")),
        )
        for name, enc in encoders:
            cases[f"PNG encode ({name}), {what}"] = lambda enc=enc, pics=pics: [
                enc(q) for q in pics
            ]
            sizes[f"{name}, {what}"] = statistics.mean(enc(q) for q in pics)
    for fn in cases.values():
        fn()  # warm-up
    rounds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            rounds[name].append(cpu_ms_per_image(fn, n))
    report = {
        "batch": n,
        "heads": nh,
        "rounds": args.rounds,
        "cpu_ms_per_image_median": {k: statistics.median(v) for k, v in rounds.items()},
        "cpu_ms_per_image_rounds": rounds,
        "png_bytes_mean": sizes,
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
