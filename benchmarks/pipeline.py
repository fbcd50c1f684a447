"""End-to-end `vit-attn run` throughput against the bare onnxruntime session, side by side.

The bare session runs the very graph the pipeline exports, on batches preprocessed
beforehand, so the ratio says what decoding, maps, overlays, compression and Dask cost.
Also measures the nanny's MALLOC_TRIM_THRESHOLD_ effect and peak memory against image count.

    python benchmarks/pipeline.py --images 1024 --model vit_small_patch16_224
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
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.data import list_images, load_batch, normalize  # noqa: E402
from pipeline.job import prepare  # noqa: E402
from pipeline.runtime import OrtRunner, RuntimeOptions  # noqa: E402


def make_images(folder: Path, n: int, size: tuple[int, int] = (500, 375)) -> Path:
    """ImageNet-like JPEGs (500x375, quality 90) with smooth structure, generated once."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = len(list(folder.glob("*.jpg")))
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(existing, n):
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.28)]
        base = np.sin(xx * fx + phase)[..., None] * np.cos(yy * fy)[..., None] * rng.uniform(40, 120, 3)
        img = np.clip(base + 128 + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:06d}.jpg", quality=90)
    return folder


def write_config(folder: Path, images: Path, model: str, batch: int, cluster: dict, threads: int, cache: Path) -> Path:
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
        u8, _ = load_batch([images.absolute(i) for i in range(start, min(start + bs, len(images.paths)))], plan.preprocess)
        batches.append(normalize(u8, plan.preprocess))
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
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"vit-attn run failed:\n{proc.stderr}")
    m = re.search(r"done: (\d+) ok, (\d+) failed, ([\d.]+) img/s over ([\d.]+)s", proc.stderr)
    assert m, proc.stderr
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"img_s": float(m.group(3)), "seconds": float(m.group(4)), "wall": wall, "maxrss_mb": max(maxrss, before) / 1024}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vit-attn-bench")
    p.add_argument("--quick", action="store_true", help="vit_tiny, 64 images: a smoke run")
    p.add_argument("--memory", action="store_true", help="also compare peak memory at N and 10N images (vit_tiny)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.images, args.batch = "vit_tiny_patch16_224", 64, 16
    cores = os.cpu_count() or 1
    work = args.workdir
    images = make_images(work / f"images_{args.images}", args.images)
    cache = work / "cache"
    variants = {
        "in-process, ORT threads=cores": ({"kind": "none"}, cores, None),
        "local 1 worker x cores threads": ({"kind": "local", "n_workers": 1}, cores, None),
        f"local {cores} workers x 1 thread": ({"kind": "local", "n_workers": cores}, 1, None),
        f"local {cores} workers x 1 thread, nanny MALLOC_TRIM_THRESHOLD_=65536": (
            {"kind": "local", "n_workers": cores, "worker_env": {"MALLOC_TRIM_THRESHOLD_": "65536"}}, 1, None),
    }
    results: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    bare: list[float] = []
    configs = {}
    for i, (name, (cluster, threads, _)) in enumerate(variants.items()):
        folder = work / f"variant{i}"
        folder.mkdir(parents=True, exist_ok=True)
        configs[name] = write_config(folder, images, args.model, args.batch, cluster, threads, cache)
    for _ in range(args.repeats):
        bare.append(bare_session(configs[next(iter(configs))], n_batches_max=max(4, args.images // args.batch // 2)))
        for name, (_, _, env) in variants.items():
            results[name].append(pipeline_run(configs[name], env))
    bare_img_s = statistics.median(bare)
    print(f"\n{args.model}, {args.images} JPEG images 500x375, batch {args.batch}, {cores} cores, "
          f"load before/after: {open('/proc/loadavg').read().split()[:3]}")
    print("| variant | img/s (processing) | wall s (incl. start-up, export cached) | vs bare session |")
    print("|---|---|---|---|")
    print(f"| bare onnxruntime session, pre-decoded batches | {bare_img_s:.1f} | | 1.00 |")
    table = {"bare": bare_img_s}
    for name, runs in results.items():
        img_s = statistics.median(r["img_s"] for r in runs)
        wall = statistics.median(r["wall"] for r in runs)
        table[name] = img_s
        print(f"| {name} | {img_s:.1f} | {wall:.1f} | {img_s / bare_img_s:.2f} |")
    out = {"model": args.model, "images": args.images, "table": table}
    if args.memory:
        out["memory"] = memory_check(work, cache)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


def memory_check(work: Path, cache: Path, small: int = 128) -> dict[str, float]:
    """Peak RSS of an in-process run at N and 10N images: batches in flight are bounded."""
    peaks = {}
    for n in (small, small * 10):
        images = make_images(work / f"images_{n}", n)
        folder = work / f"mem{n}"
        folder.mkdir(parents=True, exist_ok=True)
        config = write_config(folder, images, "vit_tiny_patch16_224", 32, {"kind": "none"}, 0, cache)
        code = (
            "import resource, sys; from pipeline.cli import main; rc = main(['run', sys.argv[1], '--no-progress']);"
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        shutil.rmtree(folder / "run.zarr", ignore_errors=True)
        proc = subprocess.run([sys.executable, "-c", code, str(config)], cwd=REPO, capture_output=True, text=True)
        peaks[n] = int(re.search(r"MAXRSS (\d+)", proc.stdout).group(1)) / 1024
        print(f"peak RSS, in-process, vit_tiny, {n} images: {peaks[n]:.0f} MB")
    return peaks


if __name__ == "__main__":
    main()
