"""benchmarks/gpu.py runs its whole path on the CPU (`--device cpu --quick`), as CI can."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_BENCH = REPO / "benchmarks" / "gpu.py"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_benchmark_quick_on_cpu(tmp_path, export_cache):
    out = tmp_path / "gpu.json"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(GPU_BENCH),
            "--device",
            "cpu",
            "--quick",
            "--cache-dir",
            str(export_cache),
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report  # stdout is the one JSON
    cells = report["inference"]
    assert {c["outputs"] for c in cells} == {"cls", "all", "logits"}  # logits: timm's forward
    assert {(c["precision"], c["variant"], c["backend"]) for c in cells} == {
        ("fp32", "plain", "ort"),
        ("fp32", "fused", "ort"),
        ("mixed", "plain", "ort"),
        ("mixed", "fused", "ort"),
        ("fp32", "plain", "torch"),
        ("fp32", "timm", "timm"),
    }
    assert not any(c["outputs"] == "all" and c["variant"] == "fused" for c in cells)
    assert all("error" not in c and c["median"] > 0 for c in cells), [
        c for c in cells if "error" in c
    ]
    assert {c["batch"] for c in cells} == {2, 4}
    modes = {(r["images"], r["mode"]) for r in report["decode"]}
    for kind in ("JPEG 640x480", "PNG 500x375"):
        assert (kind, "1 thread(s), 1 process") in modes and (
            kind,
            "2 Dask worker(s) x 1 thread",
        ) in modes
    assert ("JPEG 640x480", "torchvision decode_jpeg, cpu") in modes
    assert all(r["images_per_s"] > 0 for r in report["decode"])
    pipe = report["pipeline"]
    assert pipe["images_per_s"] > 0 and not pipe["failed_batches"] and pipe["images"] == 12
    assert (
        "## Inference" in proc.stderr
        and "| all: " in proc.stderr
        and "## Pipeline end to end" in proc.stderr
    )
    print(f"gpu.py --device cpu --quick: {seconds:.1f} s")


@pytest.mark.slow  # runs the benchmark script in a subprocess (imports torch, exports)
def test_gpu_benchmark_without_a_gpu_says_so(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run(
        [
            sys.executable,
            str(GPU_BENCH),
            "--device",
            "cuda",
            "--skip",
            "inference",
            "decode",
            "pipeline",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "torch sees no CUDA device" in proc.stderr and "--device cpu" in proc.stderr
