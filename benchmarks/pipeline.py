"""End-to-end `vit-attn run` throughput against the bare onnxruntime session, side by side.

The bare session runs the very graph the pipeline exports, on batches preprocessed
beforehand, so the ratio says what decoding, maps, overlays, compression and Dask cost.
Variants: in-process and one local Dask worker, each holding one batch at a time or two
(the default: one batch's decoding and writing overlap the other's inference), and one
single-thread session per core. `--malloc-trim` adds workers with the nanny's
MALLOC_TRIM_THRESHOLD_; `--memory` compares the peak memory of processing N and 10N images.

    python benchmarks/pipeline.py --images 1024 --repeats 2 --model vit_small_patch16_224 --memory
    python benchmarks/pipeline.py --memory-only  # the peak-memory check alone (~3 min)
    python benchmarks/pipeline.py --quick        # smoke run, < 1 min
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipeline"))

from vit_attn.config import load_config  # noqa: E402
from vit_attn.decode import load_batch  # noqa: E402
from vit_attn.plan import prepare  # noqa: E402
from vit_attn.runtime import OrtRunner, RuntimeOptions  # noqa: E402
from vit_attn.sources import list_images  # noqa: E402


def make_images(folder: Path, n: int, size: tuple[int, int] = (500, 375)) -> Path:
    """ImageNet-like JPEGs (500x375, quality 90) with smooth structure, generated once."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = len(list(folder.glob("*.jpg")))
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(existing, n):
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.28)]
        base = (
            np.sin(xx * fx + phase)[..., None]
            * np.cos(yy * fy)[..., None]
            * rng.uniform(40, 120, 3)
        )
        img = np.clip(base + 128 + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:06d}.jpg", quality=90)
    return folder


def write_config(
    folder: Path, images: Path, model: str, batch: int, cluster: dict, threads: int, cache: Path
) -> Path:
    cfg = {
        "model": {"name": model, "seed": 0},
        "data": {"source": str(images)},
        "attention": {"layers": [-1]},
        "inference": {"batch_size": batch, "threads": threads, "cache_dir": str(cache)},
        "output": {"store": str(folder / "run.zarr"), "overlays": "mean"},
        "cluster": cluster,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def bare_session(config: Path, n_batches_max: int) -> float:
    """Images/s of the exported graph alone on pre-decoded batches (export excluded)."""
    cfg = load_config(config)
    prepared = prepare(cfg, overwrite=True)
    plan = prepared.plan
    images = list_images(cfg.data.source)
    runner = OrtRunner(Path(plan.onnx_path), RuntimeOptions(threads=os.cpu_count() or 1))
    bs = cfg.inference.batch_size
    batches = []
    for start in range(0, min(len(images.paths), bs * n_batches_max), bs):
        u8, _ = load_batch(
            [images.absolute(i) for i in range(start, min(start + bs, len(images.paths)))],
            plan.preprocess,
        )
        batches.append(u8)  # the graph takes uint8 NHWC pixels and normalises inside
    runner.run(batches[0])  # warm-up
    t = time.perf_counter()
    n = 0
    for b in batches:
        runner.run(b)
        n += len(b)
    return n / (time.perf_counter() - t)


def pipeline_run(config: Path, extra_env: dict[str, str] | None = None) -> dict[str, float]:
    """Run `vit-attn run` in a fresh process; parse its throughput, time its wall clock and memory."""
    store = yaml.safe_load(config.read_text())["output"]["store"]
    shutil.rmtree(store, ignore_errors=True)
    env = {**os.environ, **(extra_env or {})}
    cmd = [sys.executable, "-m", "vit_attn.cli", "run", str(config), "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"vit-attn run failed:\n{proc.stderr}")
    m = re.search(r"done: (\d+) ok, (\d+) failed, ([\d.]+) img/s over ([\d.]+)s", proc.stderr)
    assert m, proc.stderr
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "img_s": float(m.group(3)),
        "seconds": float(m.group(4)),
        "wall": wall,
        "maxrss_mb": max(maxrss, before) / 1024,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vit-attn-bench")
    p.add_argument("--quick", action="store_true", help="vit_tiny, 64 images: a smoke run")
    p.add_argument(
        "--memory",
        action="store_true",
        help="also compare peak memory at N and 10N images (vit_tiny)",
    )
    p.add_argument(
        "--malloc-trim",
        action="store_true",
        help="also run workers with the nanny's MALLOC_TRIM_THRESHOLD_",
    )
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory check")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.images, args.batch = "vit_tiny_patch16_224", 64, 16
    cores = os.cpu_count() or 1
    work = args.workdir
    if args.memory_only:
        out = {"memory": memory_check(work, work / "cache")}
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        return out
    images = make_images(work / f"images_{args.images}", args.images)
    cache = work / "cache"
    # batches_per_worker 1: decode, infer, maps and write in turn; 2 (the default): one batch's
    # CPU stages overlap the other's inference (one inference at a time per process).
    variants = {
        "in-process, 1 batch at a time": ({"kind": "none", "batches_per_worker": 1}, cores, None),
        "in-process, 2 batches (default)": ({"kind": "none"}, cores, None),
        "local 1 worker, 1 batch at a time": (
            {"kind": "local", "n_workers": 1, "batches_per_worker": 1},
            cores,
            None,
        ),
        "local 1 worker, 2 batches (default)": ({"kind": "local", "n_workers": 1}, cores, None),
        f"local {cores} workers x 1 ORT thread, 1 batch each": (
            {"kind": "local", "n_workers": cores, "batches_per_worker": 1},
            1,
            None,
        ),
    }
    if args.malloc_trim:
        variants[f"local {cores} workers x 1 ORT thread, nanny MALLOC_TRIM_THRESHOLD_=65536"] = (
            {
                "kind": "local",
                "n_workers": cores,
                "batches_per_worker": 1,
                "worker_env": {"MALLOC_TRIM_THRESHOLD_": "65536"},
            },
            1,
            None,
        )
    results: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    bare: list[float] = []
    configs = {}
    for i, (name, (cluster, threads, _)) in enumerate(variants.items()):
        folder = work / f"variant{i}"
        folder.mkdir(parents=True, exist_ok=True)
        configs[name] = write_config(
            folder, images, args.model, args.batch, cluster, threads, cache
        )
    for _ in range(args.repeats):
        bare.append(
            bare_session(
                configs[next(iter(configs))], n_batches_max=max(4, args.images // args.batch // 2)
            )
        )
        for name, (_, _, env) in variants.items():
            results[name].append(pipeline_run(configs[name], env))
    bare_img_s = statistics.median(bare)
    print(
        f"\n{args.model}, {args.images} JPEG images 500x375, batch {args.batch}, {cores} cores, "
        f"load before/after: {open('/proc/loadavg').read().split()[:3]}"
    )
    print(
        "| variant | img/s (processing) | wall s (incl. start-up, export cached) | vs bare session |"
    )
    print("|---|---|---|---|")
    print(f"| bare onnxruntime session, pre-decoded batches | {bare_img_s:.1f} | | 1.00 |")
    table = {"bare": bare_img_s}
    for name, runs in results.items():
        img_s = statistics.median(r["img_s"] for r in runs)
        wall = statistics.median(r["wall"] for r in runs)
        table[name] = img_s
        print(f"| {name} | {img_s:.1f} | {wall:.1f} | {img_s / bare_img_s:.2f} |")
    out = {
        "model": args.model,
        "images": args.images,
        "table": table,
        "bare_runs": bare,
        "runs": {name: [r["img_s"] for r in runs] for name, runs in results.items()},
    }
    if args.memory:
        out["memory"] = memory_check(work, cache)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


_PEAK_CODE = """
import sys
from vit_attn.config import load_config
from vit_attn.plan import prepare
from vit_attn.orchestrate import execute

def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

cfg = load_config(sys.argv[1])
prepared = prepare(cfg, overwrite=True)
planning = hwm_mb()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak: measure processing alone
summary = execute(prepared.plan, prepared.tasks, cfg.cluster, progress=False)
assert summary.images_ok == len(prepared.images.paths), summary
print("PEAK", planning, hwm_mb())
"""


def memory_check(work: Path, cache: Path, small: int = 128) -> dict[str, dict[str, float]]:
    """Peak RSS of an in-process run at N and 10N images, processing phase apart from planning.

    Planning (torch, timm, the export check) sets a high-water mark that would hide any growth
    during processing, so the peak is reset (/proc/self/clear_refs) once the plan is made.
    """
    peaks = {}
    for n in (small, small * 10):
        images = make_images(work / f"images_{n}", n)
        folder = work / f"mem{n}"
        folder.mkdir(parents=True, exist_ok=True)
        config = write_config(
            folder, images, "vit_tiny_patch16_224", 32, {"kind": "none"}, 0, cache
        )
        shutil.rmtree(folder / "run.zarr", ignore_errors=True)
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK_CODE, str(config)],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        m = re.search(r"PEAK ([\d.]+) ([\d.]+)", proc.stdout)
        if proc.returncode != 0 or not m:
            raise SystemExit(f"memory run failed:\n{proc.stderr}")
        peaks[str(n)] = {"planning_mb": float(m.group(1)), "processing_mb": float(m.group(2))}
        print(
            f"peak RSS, in-process, vit_tiny, {n} images: planning {peaks[str(n)]['planning_mb']:.0f} MB, "
            f"processing {peaks[str(n)]['processing_mb']:.0f} MB"
        )
    return peaks


if __name__ == "__main__":
    main()
