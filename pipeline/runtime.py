"""Inference backends: an onnxruntime session (CPU or CUDA EP) and a torch reference.

Both take one contiguous float32 NCHW batch and return the graph's outputs by name, so
the rest of the pipeline never knows which one ran.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import BackendError

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class RuntimeOptions:
    """How a session runs; `threads=0` means all cores of this process's share."""

    device: str = "cpu"
    threads: int = 0
    allow_cpu_fallback: bool = False
    device_id: int = 0
    tensorrt: bool = False
    trt_cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise BackendError(f"inference.device must be one of {DEVICES}, got {self.device!r}")


class Runner(Protocol):
    """One batch in, named outputs out."""

    output_names: list[str]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


def _check_batch(batch: np.ndarray) -> np.ndarray:
    if batch.dtype != np.float32 or batch.ndim != 4:
        raise BackendError(f"a batch must be float32 [B, 3, H, W], got {batch.dtype} {batch.shape}")
    return np.ascontiguousarray(batch)


def available_threads() -> int:
    """Cores this process may use (affinity-aware, so containers and SLURM cgroups are respected)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class OrtRunner:
    """An onnxruntime session with explicit threads and, on CUDA, IO binding."""

    def __init__(self, onnx_path: Path, options: RuntimeOptions) -> None:
        import onnxruntime as ort

        self.options = options
        so = ort.SessionOptions()
        # onnxruntime ignores OMP_NUM_THREADS: without this, Dask workers x ORT threads oversubscribe.
        so.intra_op_num_threads = options.threads or available_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        providers = self._providers(ort)
        try:
            self.session = ort.InferenceSession(str(onnx_path), sess_options=so, providers=providers)
        except Exception as exc:
            raise BackendError(f"onnxruntime cannot load {onnx_path}: {str(exc).splitlines()[0][:300]}") from None
        self.providers = self.session.get_providers()
        self._check_device()
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_name = self.session.get_inputs()[0].name
        self.on_gpu = self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")

    def _providers(self, ort) -> list:
        if self.options.device == "cpu":
            return ["CPUExecutionProvider"]
        cuda = (
            "CUDAExecutionProvider",
            {
                "device_id": self.options.device_id,
                "cudnn_conv_algo_search": "HEURISTIC",
                "do_copy_in_default_stream": True,
                "arena_extend_strategy": "kSameAsRequested",
            },
        )
        providers: list = [cuda, "CPUExecutionProvider"]
        if self.options.tensorrt:
            trt_cache = str(self.options.trt_cache_dir or Path.home() / ".cache" / "vit-attn" / "trt")
            providers.insert(
                0,
                (
                    "TensorrtExecutionProvider",
                    {
                        "device_id": self.options.device_id,
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": trt_cache,
                        "trt_fp16_enable": False,
                    },
                ),
            )
        return providers

    def _check_device(self) -> None:
        # onnxruntime falls back to the CPU silently when the CUDA EP cannot load.
        if self.options.device != "cuda" or "CUDAExecutionProvider" in self.providers:
            return
        msg = (
            "inference.device is cuda but onnxruntime's CUDA execution provider did not load "
            f"(session providers: {self.providers}); onnxruntime-gpu needs matching CUDA and cuDNN "
            "libraries (pip install 'onnxruntime-gpu[cuda,cudnn]'), or set inference.device: cpu"
        )
        if not self.options.allow_cpu_fallback:
            raise BackendError(msg)
        warnings.warn(msg + "; running on the CPU because inference.allow_cpu_fallback is true", stacklevel=2)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = _check_batch(batch)
        if not self.on_gpu:
            outs = self.session.run(self.output_names, {self.input_name: batch})
            return dict(zip(self.output_names, outs))
        # IO binding: one host-to-device copy for the batch, outputs copied back once each.
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))


class TorchRunner:
    """The same wrapper in eager PyTorch: the reference, and a fallback where onnxruntime cannot run."""

    def __init__(self, graph, options: RuntimeOptions, precision: str = "fp32") -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cuda", options.device_id) if options.device == "cuda" else torch.device("cpu")
        if options.device == "cuda" and not torch.cuda.is_available():
            raise BackendError("inference.device is cuda but torch sees no CUDA device; set inference.device: cpu")
        if options.device == "cpu" and options.threads:
            torch.set_num_threads(options.threads)
        self.graph = graph.to(self.device).eval()
        self.output_names = list(graph.output_names)
        self.autocast = precision == "mixed" and self.device.type == "cuda"

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        x = torch.from_numpy(_check_batch(batch)).to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast):
            outs = self.graph(x)
        return {n: o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for n, o in zip(self.output_names, outs)}
