"""Plain vs fused attention graphs on onnxruntime's CPU EP, side by side in one process.

    python benchmarks/fused_cpu.py                      # dinov2-S at 518 px and ViT-S at 224
    python benchmarks/fused_cpu.py --models vit_small_patch16_224 --batch 8 --repeats 5

Each model (random init, seed 0: speed does not depend on the weights) is exported twice with
last-layer CLS maps and uint8 pixel input: `plain` (matmul + softmax in every block) and
`fused` (the ONNX `Attention` op in the blocks whose probabilities are not captured,
`vit_attn.variant`). The two sessions then run the same pre-generated batches alternately
(warm-up untimed, then --repeats rounds), so machine noise hits both alike. Export time is
excluded. Prints one JSON object: images/s (median of the rounds) per model and variant, the
ratio fused/plain, and the largest difference of the CLS maps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "pipeline"))

MODELS = {"vit_small_patch14_dinov2": 518, "vit_small_patch16_224": 224}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all)")
    ap.add_argument("--depth", type=int, default=0, help="cut the model to this many blocks")
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args(argv)

    from vit_attn.export import export_onnx
    from vit_attn.graphinput import GraphInput
    from vit_attn.model import load_model
    from vit_attn.runtime import OrtRunner, RuntimeOptions
    from vit_attn.specs import ModelSource, OutputSpec

    report: dict = {"batch": args.batch, "repeats": args.repeats, "models": {}}
    for name in args.models:
        size = MODELS.get(name, 224)
        kwargs = {"depth": args.depth} if args.depth else {}
        loaded = load_model(ModelSource(name, img_size=(size, size), kwargs=kwargs))
        spec = OutputSpec(layers=(loaded.layout.depth - 1,), logits=False, topk=0)
        pixels = GraphInput.pixels((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        runners = {}
        for variant in ("plain", "fused"):
            t = time.perf_counter()
            path = export_onnx(loaded, spec, "fp32", args.cache_dir, pixels, attention=variant)
            print(f"{name} {variant}: export {time.perf_counter() - t:.0f} s", file=sys.stderr)
            runners[variant] = OrtRunner(path, RuntimeOptions(threads=args.threads))
        rng = np.random.default_rng(0)
        batch = rng.integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
        outs = {v: r.run(batch)["cls_attention"].copy() for v, r in runners.items()}  # warm-up
        rates: dict[str, list[float]] = {v: [] for v in runners}
        for _ in range(args.repeats):
            for variant, runner in runners.items():
                t = time.perf_counter()
                runner.run(batch)
                rates[variant].append(args.batch / (time.perf_counter() - t))
        med = {v: statistics.median(r) for v, r in rates.items()}
        report["models"][name] = {
            "input": size,
            "tokens": loaded.layout.num_tokens,
            "images_per_s": med,
            "fused_over_plain": med["fused"] / med["plain"],
            "max_abs_diff": float(np.abs(outs["fused"] - outs["plain"]).max()),
        }
        print(json.dumps({name: report["models"][name]}), file=sys.stderr)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
