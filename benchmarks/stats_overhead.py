"""What computing the per-head statistics in the graph costs: throughput with and without them.

Usage:
    python benchmarks/stats_overhead.py [--model vit_small_patch16_224] [--images 128]
        [--batch 32] [--threads N] [--repeats 5] [--layers all|last] [--cache-dir DIR]
        [--quick] [--json OUT]

Two graphs of the same model (224 px, random init with seed 0), exported as a run exports
them (`job.output_spec`: top-5 classes, no logits), for the same stored layers:

  base:  cls_attention of the layers;
  stats: the same plus every statistic of `vit_attn.stats` for those layers
         (`attention.stats: true`).

Each runs in onnxruntime with ``--threads`` intra-op threads, ``--batch`` images per run, on
random float32 inputs made before timing (no decoding). One untimed warm-up batch each; then
``--repeats`` passes over ``--images`` images per graph, interleaved ABBA (base, stats, stats,
base, ...) so drift and neighbours' load hit both alike. Reported: median images/s (min-max)
and the overhead ``1 - stats/base`` of the medians and of each adjacent pair.

``--quick`` is a smoke run (2 blocks, 8 images, batch 4, 2 repeats): its numbers mean nothing.
Results are in docs/PERFORMANCE.md, section "Statistics overhead (issue 5)".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `vit_attn` importable from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from inference import loadavg  # noqa: E402  (benchmarks/inference.py)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from vit_attn.cachedir import cache_root
    from vit_attn.runtime import available_threads

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument(
        "--images", type=int, default=None, help="images per pass (default 128; --quick: 8)"
    )
    ap.add_argument(
        "--batch", type=int, default=None, help="images per session.run (default 32; --quick: 4)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="onnxruntime intra-op threads (default: all cores)",
    )
    ap.add_argument(
        "--repeats", type=int, default=None, help="passes per graph (default 6; --quick: 2)"
    )
    ap.add_argument(
        "--layers", choices=("all", "last"), default="all", help="stored layers (default all)"
    )
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="smoke run; numbers are not meaningful")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    args.images = args.images or (8 if args.quick else 128)
    args.batch = args.batch or (4 if args.quick else 32)
    args.repeats = args.repeats or (2 if args.quick else 6)
    args.threads = args.threads or available_threads()
    args.cache_dir = args.cache_dir or cache_root()
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from vit_attn.export import export_onnx
    from vit_attn.model import ModelSource, load_model
    from vit_attn.runtime import OrtRunner, RuntimeOptions
    from vit_attn.specs import OutputSpec

    args = parse_args(argv)
    kwargs = {"depth": 2} if args.quick else {}
    loaded = load_model(ModelSource(args.model, seed=0, kwargs=kwargs))
    lay = loaded.layout
    layers = lay.resolve_layers("all" if args.layers == "all" else [-1])
    topk = min(5, lay.num_classes)
    specs = {
        "base": OutputSpec(layers=layers, logits=False, topk=topk, cls_attention=True),
        "stats": OutputSpec(layers=layers, logits=False, topk=topk, cls_attention=True, stats=True),
    }
    runners = {}
    for key, spec in specs.items():
        t0 = time.perf_counter()
        path = export_onnx(loaded, spec, "fp32", args.cache_dir)
        runners[key] = OrtRunner(path, RuntimeOptions(threads=args.threads))
        _log(f"{key}: {path.name} exported or found in {time.perf_counter() - t0:.1f} s")

    images = np.random.default_rng(0).standard_normal(
        (args.images, 3, *lay.input_size), dtype=np.float32
    )

    def one_pass(key: str) -> float:
        t0 = time.perf_counter()
        for start in range(0, len(images), args.batch):
            runners[key].run(images[start : start + args.batch])
        return time.perf_counter() - t0

    for key in specs:  # warm-up: one batch each
        runners[key].run(images[: args.batch])
    load_before = loadavg()
    seconds: dict[str, list[float]] = {k: [] for k in specs}
    for r in range(args.repeats):
        order = ("base", "stats") if r % 2 == 0 else ("stats", "base")
        for key in order:
            seconds[key].append(one_pass(key))
        _log(
            f"repeat {r + 1}/{args.repeats}: "
            + ", ".join(f"{k} {args.images / seconds[k][-1]:.2f}" for k in specs)
            + " img/s"
        )
    load_after = loadavg()

    ips = {k: [args.images / s for s in v] for k, v in seconds.items()}
    median = {k: statistics.median(v) for k, v in ips.items()}
    pair_overheads = [1 - s / b for b, s in zip(ips["base"], ips["stats"])]
    overhead = 1 - median["stats"] / median["base"]
    command = "python benchmarks/stats_overhead.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    print(
        f"| graph ({args.model}, {len(layers)} layers, batch {args.batch}, {args.threads} threads) "
        "| img/s median (min-max) |"
    )
    print("|---|---|")
    for key, label in (
        ("base", "top-5 + cls_attention"),
        ("stats", "top-5 + cls_attention + statistics"),
    ):
        print(f"| {label} | {median[key]:.2f} ({min(ips[key]):.2f}-{max(ips[key]):.2f}) |")
    print(
        f"\noverhead of the statistics: {100 * overhead:.1f}% (medians); per adjacent pair: "
        + ", ".join(f"{100 * o:.1f}%" for o in pair_overheads)
    )
    print(
        f"{args.repeats} interleaved passes of {args.images} images each; "
        f"loadavg before {load_before}, after {load_after}"
    )
    print(f"command: {command}")
    report = {
        "command": command,
        "model": args.model,
        "layers": list(layers),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "images_per_s": ips,
        "median_images_per_s": median,
        "overhead": overhead,
        "pair_overheads": pair_overheads,
        "loadavg": [load_before, load_after],
        "host": {
            "node": platform.node(),
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
        },
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
