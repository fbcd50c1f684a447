"""GPU throughput of the whole path: inference grid, decoding, and the pipeline end to end.

Usage (on a machine with an NVIDIA GPU; onnxruntime-gpu with CUDA 13 + cuDNN 9, e.g. docker/Dockerfile):

    python benchmarks/gpu.py                         # one command, one JSON (~10 min budget)
    python benchmarks/gpu.py --batches 128 --backends ort --json gpu.json
    python benchmarks/gpu.py --device cpu --quick    # smoke run on the CPU (a few minutes on 2 cores)

Stdout is one JSON object (also written to --json); the Markdown tables go to stderr.
Three sections:

1. inference: images/s of the exported graph in onnxruntime (CUDA EP with IO binding, or the
   TensorRT EP with --tensorrt), of the same wrapper in eager torch (AMP autocast for `mixed`),
   and of timm's own forward (logits only, its fused attention, torch AMP on CUDA: the bar the
   bare graph is held to), for every combination of
     outputs    logits   logits only
                cls      + last-layer cls_attention            (default: cls full;
                full     + full last-layer attention             --quick: cls all)
                all      + cls_attention and full attention of every layer
     precision  fp32, mixed (fp16 matmuls; softmax, layer norms and head in fp32)
     attention  plain, fused (the ONNX Attention op in blocks whose probabilities are not
                captured, vit_attn.variant; `all` captures every block, so plain only)
     batch      --batches (default 64 128 256)
   on random uint8 pixel batches already in host memory (the graph's input, normalised inside;
   outputs copied back to the host, as the pipeline needs them). One untimed warm-up pass, then
   --repeats timed passes of --images images; the median is shown. A cell that fails (e.g. out
   of GPU memory) says why.
2. decode: decode + resize + crop to uint8 pixels (vit_attn.decode.load_batch) of generated
   640x480 JPEGs and 500x375 PNGs, with 1..N threads in one process and with 1..N local Dask
   worker processes, and the JPEGs on the device (vit_attn.gpu_decode: nvJPEG on cuda); median
   images/s of --repeats passes over --decode-images images, images/s per core (how many cores
   feed the GPU), and how many of the machine's cores were busy meanwhile.
3. pipeline: `vit-attn run` (vit_attn.plan.prepare + vit_attn.orchestrate.execute) on generated
   500x375 JPEGs, one local worker with --decode-threads threads, the grid's model and largest
   batch, `mixed` on cuda (so fused attention and nvJPEG decode), last-layer CLS maps and mean
   overlays; images/s from the first submission to the last write.

The model is random-init (seed 0): throughput does not depend on the weights, and nothing is
downloaded. `--quick` (meant for `--device cpu`) cuts the model to 2 blocks and the counts to a
few images so the code path runs in about a minute; its numbers mean nothing. `main(argv)`
returns everything as a dict (tests call it).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `pipeline` from the repo root when run as a script
sys.path.insert(1, str(HERE))

from inference import cpu_snapshot, environment, loadavg, others_cores  # noqa: E402  (benchmarks/inference.py)

OUTPUTS = {
    "logits": "logits only",
    "cls": "+ last-layer cls_attention",
    "full": "+ full last-layer attention",
    "all": "+ cls_attention and full attention, all layers",
}
PRECISIONS = ("fp32", "mixed")
BACKENDS = {"ort": "onnxruntime", "torch": "torch", "timm": "timm forward (torch AMP on CUDA)"}
QUICK_DEPTH = 2
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def output_spec(kind: str, depth: int):
    from vit_attn.specs import OutputSpec

    last = (depth - 1,)
    if kind == "logits":
        return OutputSpec(layers=last, logits=True, topk=0, cls_attention=False)
    if kind == "cls":
        return OutputSpec(layers=last, logits=True, topk=0, cls_attention=True)
    if kind == "full":
        return OutputSpec(layers=last, logits=True, topk=0, cls_attention=True, attention=True)
    return OutputSpec(
        layers=tuple(range(depth)), logits=True, topk=0, cls_attention=True, attention=True
    )


def _timed_passes(
    run: Callable[[np.ndarray], Any],
    images: np.ndarray,
    batch: int,
    repeats: int,
    sync: Callable[[], None],
) -> dict[str, Any]:
    def one_pass() -> None:
        for start in range(0, len(images), batch):
            run(images[start : start + batch])
        sync()

    one_pass()  # warm-up: CUDA kernels, cuDNN/TensorRT tactics, IO bindings of both batch shapes
    seconds, busy = [], []
    for _ in range(repeats):
        snap = cpu_snapshot()
        t0 = time.perf_counter()
        one_pass()
        seconds.append(time.perf_counter() - t0)
        busy.append(others_cores(snap, cpu_snapshot()))
    ips = [len(images) / s for s in seconds]
    return {"images_per_s": ips, "median": statistics.median(ips), "others_cores": busy}


def bench_inference(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Section 1: every (outputs, precision, backend, batch) cell on random host inputs."""
    import torch

    from vit_attn.export import AttentionGraph, export_onnx
    from vit_attn.graphinput import GraphInput
    from vit_attn.model import ModelSource, load_model
    from vit_attn.runtime import OrtRunner, RuntimeOptions, TorchRunner

    source = ModelSource(args.model, seed=0, kwargs={"depth": args.depth} if args.depth else {})
    loaded = load_model(source)
    depth = loaded.layout.depth
    h, w = loaded.layout.input_size
    rng = np.random.default_rng(0)
    # What the pipeline feeds the graph: uint8 pixels, normalised inside (vit_attn.graphinput).
    images = rng.integers(0, 256, (args.images, h, w, 3), dtype=np.uint8)
    pixels = GraphInput.pixels(IMAGENET_MEAN, IMAGENET_STD)
    options = RuntimeOptions(
        device=args.device,
        threads=args.threads,
        tensorrt=args.tensorrt,
        trt_cache_dir=args.cache_dir / "trt",
    )
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rows = []
    cells = [
        (kind, precision, variant)
        for kind in args.outputs
        for precision in args.precisions
        # every block is captured for `all`: the fused variant would be the same graph
        for variant in (args.variants if kind != "all" else ["plain"])
    ]
    for kind, precision, variant in cells:
        spec = output_spec(kind, depth)
        runners: dict[str, Any] = {}
        if "ort" in args.backends:
            t0 = time.perf_counter()
            path = export_onnx(loaded, spec, precision, args.cache_dir, pixels, variant)
            runners["ort"] = OrtRunner(path, options)
            _log(
                f"  {kind}/{precision}/{variant}: {path.name} ready in "
                f"{time.perf_counter() - t0:.1f} s; providers {runners['ort'].providers[:1]}"
            )
        if (
            "torch" in args.backends
            and variant == "plain"
            and not (args.device == "cpu" and precision == "mixed")
        ):
            # TorchRunner autocasts to fp16 on CUDA only: torch `mixed` on the CPU would be fp32 again.
            # A fresh model: the wrapper hooks the blocks it captures and moves the model to the device.
            runners["torch"] = TorchRunner(
                AttentionGraph(load_model(source), spec, pixels), options, precision
            )
        for backend, runner in runners.items():
            for batch in args.batches:
                row = {
                    "outputs": kind,
                    "precision": precision,
                    "variant": variant,
                    "backend": backend,
                    "batch": batch,
                }
                try:
                    row.update(_timed_passes(runner.run, images, batch, args.repeats, sync))
                    _log(f"    {backend} batch {batch}: {row['median']:.1f} img/s")
                except Exception as exc:  # out of memory and the like: report, go on
                    row["error"] = (
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    )
                    _log(f"    {backend} batch {batch}: failed: {row['error']}")
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
        del runners
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if "timm" in args.backends:
        rows += _bench_timm(args, source, images, sync)
    return rows


def _bench_timm(args: argparse.Namespace, source, images: np.ndarray, sync) -> list[dict]:
    """timm's own forward (fused attention as timm ships it, logits only), torch AMP on CUDA:
    the bar the bare graph is compared with."""
    import timm
    import torch

    kwargs = {**source.kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(source.name, pretrained=False, **kwargs).eval()
    device = torch.device(args.device)
    model = model.to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    amp = args.device == "cuda"

    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float()
        with torch.inference_mode(), torch.autocast(device.type, torch.float16, enabled=amp):
            return model((x / 255 - mean) / std).float().cpu().numpy()

    rows = []
    for batch in args.batches:
        row = {
            "outputs": "logits",
            "precision": "mixed" if amp else "fp32",
            "variant": "timm",
            "backend": "timm",
            "batch": batch,
        }
        try:
            row.update(_timed_passes(run, images, batch, args.repeats, sync))
            _log(f"    timm forward batch {batch}: {row['median']:.1f} img/s")
        except Exception as exc:
            row["error"] = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            )
        rows.append(row)
    return rows


def make_images(folder: Path, n: int, size: tuple[int, int], ext: str) -> list[Path]:
    """Smooth random images with noise (photo-like compressibility), written once per folder."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:05d}.{ext}"
        if not path.exists():
            fx, fy, phase = rng.uniform(0.005, 0.05), rng.uniform(0.005, 0.05), rng.uniform(0, 6.28)
            base = (
                np.sin(xx * fx + phase)[..., None]
                * np.cos(yy * fy)[..., None]
                * rng.uniform(40, 120, 3)
            )
            img = np.clip(base + 128 + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(path, **({"quality": 90} if ext == "jpg" else {}))
        paths.append(path)
    return paths


def _decode_chunk(paths: list[str], prep, threads: int, batch: int) -> int:
    from vit_attn.decode import load_batch

    done = 0
    for start in range(0, len(paths), batch):
        u8, _ = load_batch(paths[start : start + batch], prep, threads=threads)
        done += len(u8)  # uint8 pixels are what the graph takes: the host normalises nothing
    return done


def _device_decode_chunk(paths: list[str], prep, device: str, batch: int) -> int:
    from vit_attn.gpu_decode import load_batch

    done = 0
    for start in range(0, len(paths), batch):
        _, _, pixels = load_batch(paths[start : start + batch], prep, device)
        done += len(pixels)
    return done


def bench_decode(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Section 2: decode + preprocess throughput, threads in one process vs Dask worker processes."""
    from vit_attn.decode import Preprocess

    prep = Preprocess(input_size=(224, 224))
    sets = {
        "JPEG 640x480": make_images(work / "decode_jpg", args.decode_images, (640, 480), "jpg"),
        "PNG 500x375": make_images(work / "decode_png", args.decode_images, (500, 375), "png"),
    }
    rows = []
    for name, files in sets.items():
        paths = [str(p) for p in files]
        _decode_chunk(paths[: args.decode_batch], prep, 1, args.decode_batch)  # warm the page cache
        for threads in args.decode_threads:
            row = _measure(
                lambda paths=paths, threads=threads: _decode_chunk(
                    paths, prep, threads, args.decode_batch
                ),
                args.repeats,
            )
            rows.append(
                {
                    "images": name,
                    "mode": f"{threads} thread(s), 1 process",
                    "cores": threads,
                    **row,
                    "per_core": row["images_per_s"] / threads,
                }
            )
            _log(f"  decode {name}, {threads} thread(s): {row['images_per_s']:.1f} img/s")
    if args.decode_workers:
        rows += _bench_decode_dask(args, sets, prep)
    # JPEGs on the inference device (nvJPEG on cuda; torchvision's libjpeg on the CPU)
    paths = [str(p) for p in sets["JPEG 640x480"]]
    row = _measure(
        lambda: _device_decode_chunk(paths, prep, args.device, args.decode_batch), args.repeats
    )
    mode = "nvJPEG on the GPU" if args.device == "cuda" else "torchvision decode_jpeg, cpu"
    rows.append(
        {"images": "JPEG 640x480", "mode": mode, "cores": 1, **row, "per_core": row["images_per_s"]}
    )
    _log(f"  decode JPEG, {mode}: {row['images_per_s']:.1f} img/s")
    return rows


def _machine_busy(before, after) -> float | None:
    """Cores of the whole machine busy between two snapshots (this process and its workers included)."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return (after[1] - before[1]) / (after[0] - before[0])


def _measure(count: Callable[[], int], repeats: int) -> dict[str, Any]:
    """Median images/s over `repeats` calls of `count` (which returns the images it did)."""
    ips, busy = [], []
    for _ in range(repeats):
        snap = cpu_snapshot()
        t0 = time.perf_counter()
        n = count()
        ips.append(n / (time.perf_counter() - t0))
        busy.append(_machine_busy(snap, cpu_snapshot()))
    known = [b for b in busy if b is not None]
    return {
        "images_per_s": statistics.median(ips),
        "runs": ips,
        "machine_busy_cores": statistics.median(known) if known else None,
    }


def _bench_decode_dask(
    args: argparse.Namespace, sets: dict[str, list[Path]], prep
) -> list[dict[str, Any]]:
    import dask
    from distributed import Client, LocalCluster, wait

    from vit_attn.orchestrate import WORKER_ENV

    rows = []
    for workers in args.decode_workers:
        with (
            dask.config.set({"distributed.nanny.pre-spawn-environ": dict(WORKER_ENV)}),
            LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
            ) as lc,
            Client(lc) as client,
        ):
            client.wait_for_workers(workers)
            for name, files in sets.items():
                paths = [str(p) for p in files]
                chunks = [
                    paths[i : i + args.decode_batch]
                    for i in range(0, len(paths), args.decode_batch)
                ]
                wait(
                    client.map(
                        _decode_chunk,
                        chunks[:workers],
                        prep=prep,
                        threads=1,
                        batch=args.decode_batch,
                        pure=False,
                    )
                )

                def run_all(chunks: list = chunks) -> int:
                    futures = client.map(
                        _decode_chunk,
                        chunks,
                        prep=prep,
                        threads=1,
                        batch=args.decode_batch,
                        pure=False,
                    )
                    return sum(client.gather(futures))

                row = _measure(run_all, args.repeats)
                rows.append(
                    {
                        "images": name,
                        "mode": f"{workers} Dask worker(s) x 1 thread",
                        "cores": workers,
                        **row,
                        "per_core": row["images_per_s"] / workers,
                    }
                )
                _log(f"  decode {name}, {workers} Dask worker(s): {row['images_per_s']:.1f} img/s")
    return rows


def bench_pipeline(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Section 3: a whole `vit-attn run` (export cached beforehand, store written from scratch)."""
    import yaml

    from vit_attn.config import load_config
    from vit_attn.orchestrate import execute
    from vit_attn.plan import prepare

    images = make_images(work / "pipeline_jpg", args.pipeline_images, (500, 375), "jpg")
    batch = max(args.batches)
    precision = "mixed" if args.device == "cuda" else "fp32"
    cfg = {
        "model": {
            "name": args.model,
            "seed": 0,
            **({"kwargs": {"depth": args.depth}} if args.depth else {}),
        },
        "data": {"source": str(images[0].parent), "decode_threads": args.pipeline_decode_threads},
        "attention": {"layers": [-1]},
        "inference": {
            "device": args.device,
            "precision": precision,
            "batch_size": batch,
            "threads": args.threads,
            "cache_dir": str(args.cache_dir),
            "tensorrt": args.tensorrt,
        },
        "output": {"store": str(work / "pipeline.zarr"), "overlays": "mean"},
        "cluster": {"kind": "local", "n_workers": 1},
    }
    path = work / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config = load_config(path)
    t0 = time.perf_counter()
    prepared = prepare(config, overwrite=True)
    prepare_s = time.perf_counter() - t0
    summary = execute(prepared.plan, prepared.tasks, config.cluster, progress=False)
    result = {
        "images": len(images),
        "batch": batch,
        "precision": precision,
        "decode_threads": args.pipeline_decode_threads,
        "images_per_s": summary.images_per_second,
        "seconds": summary.seconds,
        "prepare_s": prepare_s,
        "stage_seconds": summary.stage_seconds,
        "failed_batches": summary.failed_batches,
    }
    _log(f"  pipeline: {summary.images_per_second:.1f} img/s over {summary.seconds:.1f} s")
    return result


def inference_table(rows: list[dict[str, Any]]) -> str:
    batches = sorted({r["batch"] for r in rows})
    lines = [
        "| outputs | precision | attention | backend | "
        + " | ".join(f"batch {b}" for b in batches)
        + " |",
        "|---|---|---|---|" + "---|" * len(batches),
    ]
    keys = list(
        dict.fromkeys((r["outputs"], r["precision"], r["variant"], r["backend"]) for r in rows)
    )
    for key in keys:
        cells = []
        for b in batches:
            r = next(
                (
                    r
                    for r in rows
                    if (r["outputs"], r["precision"], r["variant"], r["backend"]) == key
                    and r["batch"] == b
                ),
                None,
            )
            if r is None:
                cells.append("")
            elif "error" in r:
                cells.append("failed")
            else:
                ips = r["images_per_s"]
                cells.append(
                    f"{r['median']:.1f}"
                    + (f" ({min(ips):.1f}-{max(ips):.1f})" if len(ips) > 1 else "")
                )
        kind, precision, variant, backend = key
        lines.append(
            f"| {kind}: {OUTPUTS[kind]} | {precision} | {variant} | {BACKENDS[backend]} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def decode_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| images | mode | img/s (median) | img/s per core | machine cores busy |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        busy = "?" if r["machine_busy_cores"] is None else f"{r['machine_busy_cores']:.2f}"
        runs = f" ({min(r['runs']):.1f}-{max(r['runs']):.1f})" if len(r["runs"]) > 1 else ""
        lines.append(
            f"| {r['images']} | {r['mode']} | {r['images_per_s']:.1f}{runs} | {r['per_core']:.1f} | {busy} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from vit_attn.cachedir import cache_root
    from vit_attn.runtime import available_threads

    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument(
        "--model",
        default=None,
        help="timm ViT (default vit_base_patch16_224; --quick: vit_tiny_patch16_224)",
    )
    ap.add_argument(
        "--depth", type=int, default=None, help="cut the model to this many blocks (--quick: 2)"
    )
    ap.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes (default 64 128 256; --quick: 2 4)",
    )
    ap.add_argument(
        "--images", type=int, default=None, help="images per timed pass (default 1024; --quick: 8)"
    )
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed passes per cell (default 3; --quick: 1)"
    )
    ap.add_argument(
        "--outputs",
        nargs="+",
        choices=list(OUTPUTS),
        default=None,
        help="default: cls full (--quick: cls all)",
    )
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    ap.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=("plain", "fused"),
        default=["plain", "fused"],
        help="attention in uncaptured blocks (vit_attn.variant)",
    )
    ap.add_argument(
        "--tensorrt", action="store_true", help="onnxruntime's TensorRT EP first (engines cached)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for onnxruntime/torch (default: all cores)",
    )
    ap.add_argument(
        "--decode-images",
        type=int,
        default=None,
        help="images per decode measurement (default 256; --quick: 16)",
    )
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument(
        "--decode-threads",
        type=int,
        nargs="*",
        default=None,
        help="thread counts (default 1 2 4 .. cores)",
    )
    ap.add_argument(
        "--decode-workers",
        type=int,
        nargs="*",
        default=None,
        help="Dask worker counts (default 1 2)",
    )
    ap.add_argument(
        "--pipeline-images",
        type=int,
        default=None,
        help="images of the end-to-end run (default 2048; --quick: 12)",
    )
    ap.add_argument(
        "--pipeline-decode-threads",
        type=int,
        default=None,
        help="decode threads of its worker (default: cores)",
    )
    ap.add_argument("--skip", nargs="*", choices=("inference", "decode", "pipeline"), default=[])
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="export cache (default $VIT_ATTN_CACHE or ~/.cache/vit-attn)",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="generated images and stores (default: a temp folder)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run with a 2-block vit_tiny and a few images"
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    q = args.quick
    cores = available_threads()
    args.model = args.model or ("vit_tiny_patch16_224" if q else "vit_base_patch16_224")
    args.depth = args.depth if args.depth is not None else (QUICK_DEPTH if q else None)
    args.batches = args.batches or ([2, 4] if q else [64, 128, 256])
    args.outputs = args.outputs or (["cls", "all"] if q else ["cls", "full"])
    args.images = args.images or (8 if q else 1024)
    args.repeats = args.repeats or (1 if q else 3)
    args.decode_images = args.decode_images or (16 if q else 256)
    args.decode_batch = min(args.decode_batch, 8) if q else args.decode_batch
    if args.decode_threads is None:
        args.decode_threads = sorted({1, 2, *[2**i for i in range(2, 7) if 2**i <= cores], cores})
    if args.decode_workers is None:
        args.decode_workers = [1, 2]
    args.pipeline_images = args.pipeline_images or (12 if q else 2048)
    args.pipeline_decode_threads = args.pipeline_decode_threads or min(cores, 64)
    args.cache_dir = args.cache_dir or cache_root()
    for name in ("images", "repeats", "decode_images", "decode_batch", "pipeline_images"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(args.device)
    if args.device == "cuda" and "gpu" not in env:
        raise SystemExit(
            "--device cuda but torch sees no CUDA device; use --device cpu for a CPU smoke run"
        )
    _log(
        f"{args.model}{f' (depth {args.depth})' if args.depth else ''} on {args.device} "
        f"({env.get('gpu', env['cpu'])}), batches {args.batches}; loadavg {loadavg()}"
    )
    report: dict[str, Any] = {
        "command": "python benchmarks/gpu.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "environment": env,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "loadavg_before": loadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="vit-attn-gpu-bench-") as tmp:
        work = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        if "inference" not in args.skip:
            _log("inference:")
            report["inference"] = bench_inference(args)
        if "decode" not in args.skip:
            _log("decode:")
            report["decode"] = bench_decode(args, work)
        if "pipeline" not in args.skip:
            _log("pipeline:")
            report["pipeline"] = bench_pipeline(args, work)
        report["seconds"] = time.perf_counter() - t0
    report["loadavg_after"] = loadavg()

    _log("")
    print = _log  # noqa: A001  (the tables go to stderr; stdout carries the one JSON)
    if report.get("inference"):
        print(
            f"## Inference, {args.model} at 224 px, {args.device} ({env.get('gpu', env['cpu'])}), images/s, "
            f"median of {args.repeats} pass(es) of {args.images} images\n"
        )
        print(inference_table(report["inference"]) + "\n")
    if report.get("decode"):
        print("## Decode + resize + crop to 224 px (uint8 pixels; host and device)\n")
        print(decode_table(report["decode"]) + "\n")
    if report.get("pipeline"):
        p = report["pipeline"]
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in p["stage_seconds"].items())
        print(
            f"## Pipeline end to end: {p['images_per_s']:.1f} img/s ({p['images']} JPEGs 500x375, batch {p['batch']}, "
            f"{p['precision']}, 1 local worker with {p['decode_threads']} decode threads; worker time: {stages})\n"
        )
    print(
        f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, {env['cpu']}, nproc {env['nproc']}; "
        f"loadavg before {report['loadavg_before']}, after {report['loadavg_after']}"
        + ("  [--quick: smoke run, numbers not meaningful]" if args.quick else "")
    )
    text = json.dumps(report, indent=2, default=str)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    sys.stdout.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
