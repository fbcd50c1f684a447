"""ONNX export vs the per-image PyTorch loop: attention-map throughput, side by side in one run.

Usage:
    python benchmarks/inference.py [--models vit_tiny_patch16_224 vit_small_patch16_224]
        [--images 256] [--batch 32] [--threads N] [--repeats 3] [--device cpu|cuda]
        [--cache-dir DIR] [--quick] [--json OUT]

For each model (224 px, random init with seed 0) it times four ways of getting the outputs:

  (a) the per-image PyTorch loop of facebookresearch/dino's ``visualize_attention.py``: one
      image at a time through the eager timm model with unfused attention, a forward hook on
      the last block's ``attn.attn_drop`` capturing the softmax, ``torch.no_grad()``, the CLS
      row copied to numpy; torch runs on ``--threads`` threads;
  (b) the exported graph in onnxruntime, ``--batch`` images per run, logits + last-layer
      ``cls_attention``;
  (c) as (b), plus the full last-layer ``attention`` matrices;
  (d) as (b), logits only (the cost of the model alone, the floor for (b)).

(b)-(d) use ``vit_attn.export.export_onnx`` (cached on disk; export time is reported but never
timed) and ``vit_attn.runtime.OrtRunner`` with ``--threads`` intra-op threads. Each variant
gets one untimed warm-up batch (for (a): as many images, one at a time). The variants are
interleaved across repeats (a b c d a b c d ...) so machine noise hits all of them alike; one
repeat is one pass over all ``--images`` images, and the table shows the median images/s
(with min-max over repeats). Inputs are random float32 NCHW tensors made before timing:
decoding and preprocessing are not part of any variant.

``--quick`` is a smoke run (8 images, batch 4, one repeat, models cut to 2 blocks so the three
exports take seconds): it checks the code path, its numbers mean nothing. ``main(argv)``
returns the results as a dict, so tests can call it. The results are in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `vit_attn` importable from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))

VARIANTS: dict[str, str] = {
    "a": "PyTorch per-image loop, last-layer attention (DINO visualize_attention)",
    "b": "onnxruntime batch, logits + last-layer cls_attention",
    "c": "onnxruntime batch, logits + cls_attention + full last-layer attention",
    "d": "onnxruntime batch, logits only",
}
DEFAULT_MODELS = ("vit_tiny_patch16_224", "vit_small_patch16_224")
QUICK_DEPTH = 2


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> str | None:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, busy CPU-s of the whole machine, CPU-s of this process), for `others_cores`."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal ...: busy is everything but idle and iowait
    ticks = [int(v) for v in fields[:8]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    t = os.times()
    return time.perf_counter(), busy / _CLK_TCK, t.user + t.system


def others_cores(before, after) -> float | None:
    """Cores kept busy by other processes between two snapshots: the noise each pass saw."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, Any]:
    import onnxruntime
    import timm
    import torch

    env: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
    }
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


class TorchPerImage:
    """Variant (a): DINO's loop. One image per forward, last-block attention from a hook."""

    def __init__(self, loaded, device: str) -> None:
        import torch

        from vit_attn.model import attention_modules

        self.torch = torch
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        self.layout = loaded.layout
        self._captured: list = []
        last = attention_modules(self.model)[-1]
        # attn_drop is the identity in eval mode: its input is the softmax probabilities.
        self._handle = last.attn_drop.register_forward_hook(
            lambda mod, args, out: self._captured.append(args[0])
        )

    def run(self, images: np.ndarray) -> np.ndarray:
        """CLS-row maps [N, heads, gh, gw] for the images, one forward each."""
        torch = self.torch
        lay = self.layout
        p = lay.num_prefix_tokens
        gh, gw = lay.grid
        out = np.empty((len(images), lay.num_heads, gh, gw), np.float32)
        for i in range(len(images)):
            x = torch.from_numpy(images[i : i + 1]).to(self.device)
            with torch.no_grad():
                self.model(x)
            attn = self._captured.pop()  # [1, heads, T, T]
            out[i] = attn[0, :, 0, p:].reshape(lay.num_heads, gh, gw).cpu().numpy()
        self._captured.clear()
        return out

    def close(self) -> None:
        self._handle.remove()


def _ort_pass(runner, images: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    first: dict[str, np.ndarray] = {}
    for start in range(0, len(images), batch):
        outs = runner.run(images[start : start + batch])
        if not first:
            first = outs
    return first


def bench_model(name: str, args: argparse.Namespace, images: np.ndarray) -> dict[str, Any]:
    import torch

    from vit_attn.export import OutputSpec, export_onnx
    from vit_attn.model import ModelSource, load_model
    from vit_attn.runtime import OrtRunner, RuntimeOptions

    kwargs = {"depth": args.depth} if args.depth else {}
    source = ModelSource(name, seed=0, kwargs=kwargs)
    # Two instances: the exporter registers its own hooks on the model it exports, and (a)
    # should run a model with exactly one hook, as DINO's script does.
    exported = load_model(source)
    lay = exported.layout
    last = lay.depth - 1
    specs = {
        "b": OutputSpec(layers=(last,), logits=True, topk=0, cls_attention=True),
        "c": OutputSpec(layers=(last,), logits=True, topk=0, cls_attention=True, attention=True),
        "d": OutputSpec(layers=(last,), logits=True, topk=0, cls_attention=False),
    }
    export_s: dict[str, float] = {}
    runners = {}
    options = RuntimeOptions(device=args.device, threads=args.threads)
    for key, spec in specs.items():
        t0 = time.perf_counter()
        path = export_onnx(exported, spec, "fp32", args.cache_dir)
        export_s[key] = round(time.perf_counter() - t0, 2)
        runners[key] = OrtRunner(path, options)
        _log(
            f"  {name} ({key}): {path.name} exported or found in {export_s[key]:.1f} s; "
            f"providers {runners[key].providers[:1]}"
        )
    del exported

    torch_runner = TorchPerImage(load_model(source), args.device)
    passes: dict[str, Callable[[np.ndarray], Any]] = {
        "a": torch_runner.run,
        "b": lambda x: _ort_pass(runners["b"], x, args.batch),
        "c": lambda x: _ort_pass(runners["c"], x, args.batch),
        "d": lambda x: _ort_pass(runners["d"], x, args.batch),
    }

    # Warm-up, untimed: one batch each. It also checks that (a) and (b) compute the same maps.
    warm = images[: args.batch]
    maps_a = passes["a"](warm)
    maps_b = passes["b"](warm)["cls_attention"][:, 0]
    max_diff = float(np.abs(maps_a - maps_b[: len(maps_a)]).max())
    passes["c"](warm)
    passes["d"](warm)
    if max_diff > 1e-3:
        raise RuntimeError(
            f"{name}: (a) and (b) disagree on the CLS maps (max |diff| {max_diff:.2e})"
        )

    times: dict[str, list[float]] = {k: [] for k in passes}
    others: dict[str, list[float | None]] = {k: [] for k in passes}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for r in range(args.repeats):
        for key, fn in passes.items():
            sync()
            snap = cpu_snapshot()
            t0 = time.perf_counter()
            fn(images)
            sync()
            times[key].append(time.perf_counter() - t0)
            others[key].append(others_cores(snap, cpu_snapshot()))
        _log(
            f"  {name} repeat {r + 1}/{args.repeats}: "
            + ", ".join(f"({k}) {len(images) / t[-1]:.1f}" for k, t in times.items())
            + " img/s; other processes busy "
            + ", ".join("?" if o[-1] is None else f"{o[-1]:.2f}" for o in others.values())
            + " cores"
        )
    torch_runner.close()

    n = len(images)
    ips = {k: [n / t for t in ts] for k, ts in times.items()}
    median = {k: statistics.median(v) for k, v in ips.items()}
    return {
        "model": name,
        "depth": lay.depth,
        "num_heads": lay.num_heads,
        "tokens": lay.num_tokens,
        "export_s": export_s,
        "max_abs_diff_a_b": max_diff,
        "seconds": times,
        "others_cores": others,
        "images_per_s": ips,
        "median_images_per_s": median,
        "ratios": {
            "b/d": median["b"] / median["d"],
            "b/a": median["b"] / median["a"],
            "c/b": median["c"] / median["b"],
        },
    }


def markdown_table(results: list[dict[str, Any]]) -> str:
    def cell(r: dict[str, Any], k: str) -> str:
        v = r["images_per_s"][k]
        m = r["median_images_per_s"][k]
        return f"{m:.1f} ({min(v):.1f}-{max(v):.1f})" if len(v) > 1 else f"{m:.1f}"

    lines = [
        "| model | (a) PyTorch per-image, last-layer attn | (b) ORT logits + cls_attention | "
        "(c) ORT + full attention | (d) ORT logits only | b/d | b/a |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratios = r["ratios"]
        lines.append(
            f"| {r['model']} | {cell(r, 'a')} | {cell(r, 'b')} | {cell(r, 'c')} | {cell(r, 'd')} "
            f"| {ratios['b/d']:.2f} | {ratios['b/a']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from vit_attn.cachedir import cache_root
    from vit_attn.runtime import available_threads

    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), help="timm ViT names (224 px)"
    )
    ap.add_argument(
        "--images", type=int, default=None, help="images per pass (default 256; --quick: 8)"
    )
    ap.add_argument(
        "--batch", type=int, default=None, help="onnxruntime batch size (default 32; --quick: 4)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch and onnxruntime intra-op threads (default: all cores)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved passes per variant (default 3; --quick: 1)",
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="export cache (default: $VIT_ATTN_CACHE or ~/.cache/vit-attn)",
    )
    ap.add_argument(
        "--depth",
        type=int,
        default=None,
        help="override the models' block count (default: as built; --quick: 2)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run (< 60 s on 2 cores); numbers are not meaningful",
    )
    ap.add_argument(
        "--json", type=Path, default=None, help="write all results and the environment to this file"
    )
    args = ap.parse_args(argv)
    quick = args.quick
    args.images = args.images or (8 if quick else 256)
    args.batch = args.batch or (4 if quick else 32)
    args.repeats = args.repeats or (1 if quick else 3)
    args.threads = args.threads or available_threads()
    args.cache_dir = args.cache_dir or cache_root()
    if args.depth is None and quick:
        args.depth = QUICK_DEPTH
    for flag in ("images", "batch", "repeats", "threads"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    load_before = loadavg()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    env = environment(args.device)
    _log(
        f"{len(args.models)} model(s), {args.images} images, batch {args.batch}, {args.threads} threads, "
        f"{args.repeats} repeat(s), device {args.device}; loadavg {load_before}"
    )
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.images, 3, 224, 224), dtype=np.float32)
    try:
        results = [bench_model(name, args, images) for name in args.models]
    finally:
        torch.set_num_threads(torch_threads)  # main() may run inside a test process
    load_after = loadavg()

    command = "python benchmarks/inference.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    table = markdown_table(results)
    print()
    print(table)
    print()
    print(
        f"images/s, median (min-max) of {args.repeats} interleaved repeats; {args.images} images, "
        f"ORT batch {args.batch}, {args.threads} threads, {args.device}"
        + (f", models cut to {args.depth} blocks" if args.depth else "")
        + (" [--quick: smoke run, numbers not meaningful]" if args.quick else "")
    )
    print(
        "export + session (s; a cache hit costs only hashing the weights): "
        + "; ".join(f"{r['model']} {r['export_s']}" for r in results)
    )
    busy = [o for r in results for v in r["others_cores"].values() for o in v if o is not None]
    if busy:
        print(
            f"other processes kept {statistics.mean(busy):.2f} cores busy on average during the timed passes "
            f"(max {max(busy):.2f} of {env['nproc']})"
        )
    print(f"loadavg before: {load_before}; after: {load_after}")
    print(
        f"{env['cpu']}, nproc {env['nproc']}; torch {env['torch']}, "
        f"onnxruntime {env['onnxruntime']}, timm {env['timm']}"
    )

    report = {
        "command": command,
        "environment": env,
        "settings": {
            "images": args.images,
            "batch": args.batch,
            "threads": args.threads,
            "repeats": args.repeats,
            "device": args.device,
            "depth": args.depth,
            "quick": args.quick,
            "img_size": 224,
            "weights": "random:0",
        },
        "variants": VARIANTS,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "results": results,
        "table": table,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
