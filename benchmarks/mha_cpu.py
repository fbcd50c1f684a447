"""The attention core on onnxruntime's CPU EP: the plain nodes the CPU graph uses (MatMul,
Mul, Softmax, MatMul) against onnxruntime's contrib `com.microsoft.MultiHeadAttention`.

Issue 15 asked whether the contrib kernel beats the plain graph on the CPU. One attention
core (no projections) at ViT shapes, random inputs, both sessions in one process on the same
threads, rounds interleaved; prints one JSON (ms per batch and layer, and the max difference).

    python benchmarks/mha_cpu.py                       # vit_tiny at 224: 3 heads, 197 tokens
    python benchmarks/mha_cpu.py --heads 6 --tokens 1370 --batch 8   # vit_small dinov2 at 518
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper


def _model(nodes: list, inputs: list, output, initializers=(), contrib: bool = False) -> bytes:
    opsets = [helper.make_opsetid("", 20)]
    if contrib:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    graph = helper.make_graph(nodes, "attention", inputs, [output], list(initializers))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10  # what this onnxruntime reads
    return model.SerializeToString()


def plain_core(b: int, h: int, n: int, d: int) -> bytes:
    """softmax(q k^T / sqrt(d)) v on [B, H, N, d], as the exported CPU graph computes it."""
    io = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [b, h, n, d]) for x in "qkv"]
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [b, h, n, d])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [d**-0.5])
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
    ]
    return _model(nodes, io, out, [scale])


def contrib_core(b: int, h: int, n: int, d: int) -> bytes:
    """The same through com.microsoft.MultiHeadAttention on [B, N, H*d]."""
    io = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [b, n, h * d]) for x in "qkv"]
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [b, n, h * d])
    node = helper.make_node(
        "MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=h
    )
    return _model([node], io, out, contrib=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    b, h, n, d = args.batch, args.heads, args.tokens, args.head_dim
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
    cpu = ["CPUExecutionProvider"]
    sessions = {
        "plain": ort.InferenceSession(plain_core(b, h, n, d), so, providers=cpu),
        "MultiHeadAttention": ort.InferenceSession(contrib_core(b, h, n, d), so, providers=cpu),
    }
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, h, n, d), dtype=np.float32) for _ in range(3))

    def packed(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(b, n, h * d))

    feeds = {
        "plain": {"q": q, "k": k, "v": v},
        "MultiHeadAttention": {"q": packed(q), "k": packed(k), "v": packed(v)},
    }
    outs = {name: s.run(None, feeds[name])[0] for name, s in sessions.items()}  # and warm-up
    diff = float(np.abs(packed(outs["plain"]) - outs["MultiHeadAttention"]).max())
    ms: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds[name])
            ms[name].append((time.perf_counter() - t) * 1000)
    report = {
        "shape": {"batch": b, "heads": h, "tokens": n, "head_dim": d, "threads": args.threads},
        "onnxruntime": ort.__version__,
        "ms_per_batch_layer_median": {k: statistics.median(x) for k, x in ms.items()},
        "ms_rounds": ms,
        "max_abs_diff": diff,
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
