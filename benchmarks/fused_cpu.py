"""Attention graphs on onnxruntime's CPU EP, side by side: speed, and peak memory with --isolate.

    python benchmarks/fused_cpu.py                      # dinov2-S at 518 px and ViT-S at 224
    python benchmarks/fused_cpu.py --models vit_small_patch16_224 --batch 8 --repeats 5
    python benchmarks/fused_cpu.py --models vit_small_patch14_dinov2 --batch 8 \\
        --graphs plain:full plain:rows fused:full fused:rows --isolate --rounds 3

Each model (random init, seed 0: speed does not depend on the weights) is exported with
last-layer CLS maps and uint8 pixel input, once per graph of --graphs, `VARIANT[:CAPTURE]`
(`vit_attn.variant`): `plain` (matmul + softmax in every block) or `fused` (the ONNX
`Attention` op in the blocks whose whole softmax is not captured); capture `rows` (default,
what the pipeline exports: the captured block computes the CLS row only and nothing after it)
or `full` (the captured block's whole softmax: the graph before the rows capture); `+mean` or
`+heads` adds the in-graph overlays (`output.overlays`, alpha 0.5, inferno). Export time is
excluded.

In-process (default) the sessions run the same pre-generated batch alternately (warm-up
untimed, then --repeats rounds), so machine noise hits all alike. With --isolate each graph
runs in its own child process (`OrtRunner` only, torch never imported), one child per graph
per round, the graphs alternating, --rounds rounds: each child loads the session, runs one
untimed warm-up and --repeats timed batches and reports its peak RSS (VmHWM), so the figure
is that of an inference process holding this graph alone.

Prints one JSON object: per model and graph, images/s (median of the rounds), peak RSS in MiB
(--isolate: the largest over its rounds), both relative to the first graph, and the largest
difference of each graph's CLS maps from the first graph's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "pipeline"))

MODELS = {"vit_small_patch14_dinov2": 518, "vit_small_patch16_224": 224}


def parse_graph(label: str) -> tuple[str, str, str]:
    """`VARIANT[:CAPTURE][+OVERLAYS][@on|@off]` -> (variant, capture, overlays)."""
    from vit_attn.variant import ROWS, check, check_capture

    graph, _, _ = label.partition("@")
    graph, _, overlays = graph.partition("+")
    if overlays not in ("", "mean", "heads"):
        raise SystemExit(f"{label}: the overlays are +mean or +heads")
    variant, _, capture = graph.partition(":")
    return check(variant), check_capture(capture or ROWS), overlays or "none"


def memory_pattern(label: str) -> str:
    """`@on` / `@off` after a graph label: onnxruntime's memory pattern for that child
    (`RuntimeOptions.memory_pattern`); none: the runner's default."""
    _, _, pattern = label.partition("@")
    if pattern not in ("", "on", "off"):
        raise SystemExit(f"{label}: the memory pattern is @on or @off")
    return pattern or "default"


def child(args: argparse.Namespace) -> None:
    """One graph in this process alone: rate and peak RSS as one JSON line on stdout."""
    from vit_attn.runtime import OrtRunner, RuntimeOptions

    batch = np.load(args.child_batch)
    pattern = {"on": True, "off": False, "default": None}[args.child_pattern]
    runner = OrtRunner(
        Path(args.child), RuntimeOptions(threads=args.threads, memory_pattern=pattern)
    )
    cls = runner.run(batch)["cls_attention"]  # warm-up, untimed
    rates = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        runner.run(batch)
        rates.append(len(batch) / (time.perf_counter() - t))
    np.save(args.child_out, cls)
    print(json.dumps({"images_per_s": statistics.median(rates), "peak_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak resident set size: VmHWM, the high-water mark of its own memory
    map. Not `getrusage().ru_maxrss`: Linux carries that across fork and exec, so a child of
    this (torch-holding) parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB elsewhere


def run_isolated(
    paths: dict[str, Path], batch: np.ndarray, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, np.ndarray]]:
    rates: dict[str, list[float]] = {g: [] for g in paths}
    peaks: dict[str, float] = {g: 0.0 for g in paths}
    outs: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = Path(tmp) / "batch.npy"
        np.save(batch_file, batch)
        for _ in range(args.rounds):
            for graph, path in paths.items():
                out_file = Path(tmp) / f"{graph.replace(':', '-').replace('@', '-')}.npy"
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    str(path),
                    "--child-batch",
                    str(batch_file),
                    "--child-out",
                    str(out_file),
                    "--threads",
                    str(args.threads),
                    "--repeats",
                    str(args.repeats),
                    "--child-pattern",
                    memory_pattern(graph),
                ]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rates[graph].append(result["images_per_s"])
                peaks[graph] = max(peaks[graph], result["peak_rss_mib"])
                outs[graph] = np.load(out_file)
                print(f"  {graph}: {result}", file=sys.stderr)
    return rates, peaks, outs


def run_in_process(
    paths: dict[str, Path], batch: np.ndarray, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    from vit_attn.runtime import OrtRunner, RuntimeOptions

    runners = {g: OrtRunner(p, RuntimeOptions(threads=args.threads)) for g, p in paths.items()}
    outs = {g: r.run(batch)["cls_attention"].copy() for g, r in runners.items()}  # warm-up
    rates: dict[str, list[float]] = {g: [] for g in runners}
    for _ in range(args.repeats):
        for graph, runner in runners.items():
            t = time.perf_counter()
            runner.run(batch)
            rates[graph].append(args.batch / (time.perf_counter() - t))
    return rates, outs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument(
        "--graphs",
        nargs="+",
        default=["plain", "fused"],
        help="VARIANT[:CAPTURE][+mean|+heads][@on|@off]",
    )
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--isolate", action="store_true", help="one child process per graph: RSS")
    ap.add_argument("--rounds", type=int, default=3, help="with --isolate: children per graph")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all)")
    ap.add_argument("--depth", type=int, default=0, help="cut the model to this many blocks")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-batch", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--child-pattern", default="default", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return {}
    graphs = {label: parse_graph(label) for label in args.graphs}

    from vit_attn.export import export_onnx
    from vit_attn.graphinput import GraphInput
    from vit_attn.model import load_model
    from vit_attn.specs import ModelSource, OutputSpec

    report: dict = {
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": args.threads,
        "isolated": args.isolate,
        "rounds": args.rounds if args.isolate else 1,
        "models": {},
    }
    for name in args.models:
        size = MODELS.get(name, 224)
        kwargs = {"depth": args.depth} if args.depth else {}
        loaded = load_model(ModelSource(name, img_size=(size, size), kwargs=kwargs))
        spec = OutputSpec(layers=(loaded.layout.depth - 1,), logits=False, topk=0)
        pixels = GraphInput.pixels((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        paths = {}
        for label, (variant, capture, overlays) in graphs.items():
            t = time.perf_counter()
            with_overlays = spec if overlays == "none" else replace(spec, overlays=overlays)
            paths[label] = export_onnx(
                loaded, with_overlays, "fp32", args.cache_dir, pixels, attention=variant,
                capture=capture,
            )  # fmt: skip
            print(f"{name} {label}: export {time.perf_counter() - t:.0f} s", file=sys.stderr)
        rng = np.random.default_rng(0)
        batch = rng.integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
        peaks: dict[str, float] = {}
        if args.isolate:
            rates, peaks, outs = run_isolated(paths, batch, args)
        else:
            rates, outs = run_in_process(paths, batch, args)
        first = args.graphs[0]
        med = {g: statistics.median(r) for g, r in rates.items()}
        entry: dict = {
            "input": size,
            "tokens": loaded.layout.num_tokens,
            "images_per_s": med,
            "images_per_s_over_first": {g: med[g] / med[first] for g in med},
            "max_abs_diff_from_first": {
                g: float(np.abs(outs[g] - outs[first]).max()) for g in outs
            },
        }
        if peaks:
            entry["peak_rss_mib"] = peaks
            entry["peak_rss_over_first"] = {g: peaks[g] / peaks[first] for g in peaks}
        report["models"][name] = entry
        print(json.dumps({name: entry}), file=sys.stderr)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
