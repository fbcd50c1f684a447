"""Two batches in flight per process vs one at a time vs the measured choice, side by side.

In one process (the in-process executor, as `cluster.kind: auto` runs on few cores), for
each image folder (PNG, JPEG) and output set, the same run three ways, interleaved over
repeats: the overlap gate fixed to one batch at a time, fixed to overlapping, and measuring
(the default, vit_attn/overlap.py). Start-up (export cached) is outside the timed part:
figures are images/s of processing and the worker's inference seconds per image.

    python benchmarks/overlap.py --images 256 --repeats 2
    python benchmarks/overlap.py --quick
    python benchmarks/overlap.py --images 64 --batch 32 --repeats 3 --cases tiny-heads \
        --formats jpeg --modes "one at a time"   # maps + overlays host ms per image
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipeline"))
sys.path.insert(0, str(REPO / "benchmarks"))

from imagesets import make_folder  # noqa: E402
from vit_attn import task  # noqa: E402
from vit_attn.config import load_config  # noqa: E402
from vit_attn.orchestrate import execute  # noqa: E402
from vit_attn.overlap import OVERLAP, SERIAL, OverlapGate  # noqa: E402
from vit_attn.plan import prepare  # noqa: E402

MODES = {"one at a time": SERIAL, "always overlap": OVERLAP, "measured (default)": None}


def run_once(config: Path, mode: str | None) -> dict[str, float]:
    task._gate = OverlapGate(fixed=mode)  # a fresh process would start with a fresh gate
    task._runners.clear()  # each run builds its session, as a fresh process does
    cfg = load_config(config)
    prepared = prepare(cfg, overwrite=True)
    t = time.perf_counter()
    summary = execute(prepared.plan, prepared.tasks, prepared.cluster or cfg.cluster, False)
    seconds = time.perf_counter() - t
    n = summary.images_ok + summary.images_failed
    return {
        "img_s": n / seconds,
        "infer_ms": 1000 * summary.stage_seconds.get("infer", 0.0) / n,
        # Host time of maps and overlays (task.py's "maps" stage): the goal is <= 1 ms for
        # vit_tiny at 224 with per-head overlays, which the graph now makes (issue 15).
        "maps_ms": 1000 * summary.stage_seconds.get("maps", 0.0) / n,
        "overlapped": summary.batches_overlapped / max(1, summary.batches_done),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vit-attn-overlap")
    p.add_argument("--quick", action="store_true", help="32 images, batch 8, 1 repeat")
    p.add_argument("--cases", nargs="+", help="a subset of: tiny-heads small-mean tiny-full")
    p.add_argument("--formats", nargs="+", default=["png", "jpeg"], choices=["png", "jpeg"])
    p.add_argument("--modes", nargs="+", choices=list(MODES), help="a subset of the modes")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch, args.repeats = 32, 8, 1
    cases = {
        "vit_tiny heads": ("vit_tiny_patch16_224", {"overlays": "heads"}, {}),
        "vit_small mean": ("vit_small_patch16_224", {"overlays": "mean"}, {}),
        "vit_tiny full attention": ("vit_tiny_patch16_224", {"overlays": "mean"}, {"full": True}),
    }
    keys = dict(zip(("tiny-heads", "small-mean", "tiny-full"), cases))
    cases = {keys[c]: cases[keys[c]] for c in args.cases} if args.cases else cases
    work = args.workdir
    results: dict[str, list[dict[str, float]]] = {}
    configs: dict[str, tuple[Path, str | None]] = {}
    modes = {m: MODES[m] for m in args.modes} if args.modes else MODES
    for fmt in args.formats:
        images = make_folder(work / f"{fmt}_{args.images}", args.images, fmt)
        for case, (model, output, attention) in cases.items():
            folder = work / f"{fmt}-{case.replace(' ', '_')}"
            folder.mkdir(parents=True, exist_ok=True)
            cfg = {
                "model": {"name": model, "seed": 0},
                "data": {"source": str(images)},
                "attention": {"layers": [-1], **attention},
                "inference": {"batch_size": args.batch, "cache_dir": str(work / "cache")},
                "output": {"store": str(folder / "run.zarr"), **output},
                "cluster": {"kind": "none"},
            }
            (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
            for name, mode in modes.items():
                configs[f"{fmt} | {case} | {name}"] = (folder / "config.yaml", mode)
    load_before = open("/proc/loadavg").read().split()[:3]
    for _ in range(args.repeats):
        for key, (config, mode) in configs.items():
            results.setdefault(key, []).append(run_once(config, mode))
            print(key, results[key][-1], file=sys.stderr)
    load_after = open("/proc/loadavg").read().split()[:3]
    print(
        f"\n{args.images} images per folder, batch {args.batch}, {os.cpu_count()} cores, "
        f"loadavg before {load_before}, after {load_after}"
    )
    print("| images | case | mode | img/s | infer ms/img | maps ms/img | batches overlapped |")
    print("|---|---|---|---|---|---|---|")
    table = {}
    for key, runs in results.items():
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        table[key] = row
        fmt, case, mode = key.split(" | ")
        print(
            f"| {fmt} | {case} | {mode} | {row['img_s']:.2f} | {row['infer_ms']:.1f} "
            f"| {row['maps_ms']:.2f} | {row['overlapped']:.0%} |"
        )
    out = {
        "images": args.images,
        "batch": args.batch,
        "load": [load_before, load_after],
        "table": table,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
