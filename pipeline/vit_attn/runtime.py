"""Inference backends: an onnxruntime session (CPU or CUDA EP) and a torch reference.

Both take one batch in the graph's input format (`vit_attn.graphinput`: the pipeline's uint8
NHWC pixels, or the model's float32 NCHW input) and return the graph's outputs by name, so the
rest of the pipeline never knows which one ran.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .cachedir import cache_root
from .errors import BackendError, first_line
from .graphinput import FLOAT_NCHW, check_batch, format_of_ort_type

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
    # onnxruntime's memory pattern (plans one block of memory from the first runs' shapes).
    # None: off on the CPU EP, where it adds 44-90% to the peak for the same speed
    # (docs/PERFORMANCE.md, "Only the rows asked"); onnxruntime's default elsewhere.
    memory_pattern: bool | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise BackendError(f"inference.device must be one of {DEVICES}, got {self.device!r}")


class Runner(Protocol):
    """One batch in, named outputs out."""

    output_names: list[str]
    input_format: str

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def run_tensor(self, pixels) -> dict[str, np.ndarray]: ...


def available_threads() -> int:
    """Cores this process may use (affinity-aware, so containers and SLURM cgroups are respected)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class OrtRunner:
    """An onnxruntime session with explicit threads and, on CUDA, IO binding."""

    def __init__(
        self, onnx_path: Path, options: RuntimeOptions, io_binding: bool | None = None
    ) -> None:
        """`io_binding`: None binds on GPUs only; True also on the CPU EP (tests the GPU code path)."""
        import onnxruntime as ort

        self.options = options
        so = ort.SessionOptions()
        # onnxruntime ignores OMP_NUM_THREADS: without this, Dask workers x ORT threads oversubscribe.
        so.intra_op_num_threads = options.threads or available_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # onnxruntime's own log lines (coloured, before our one-line error, e.g. a CUDA provider
        # that does not load) only with -v; every failure is raised and said once anyway.
        verbose = (
            logging.getLogger().getEffectiveLevel() <= logging.INFO
            or os.environ.get("VIT_ATTN_WORKER_TRACEBACKS") == "1"
        )
        ort.set_default_logger_severity(3 if verbose else 4)
        so.log_severity_level = 3 if verbose else 4
        pattern = options.memory_pattern
        so.enable_mem_pattern = options.device != "cpu" if pattern is None else pattern
        providers = self._providers(ort)
        try:
            self.session = ort.InferenceSession(
                str(onnx_path), sess_options=so, providers=providers
            )
        except Exception as exc:
            raise BackendError(
                f"onnxruntime cannot load {onnx_path}: {first_line(exc)}; if the file is damaged, "
                "delete it and run again (a cached graph is exported again)"
            ) from None
        self.providers = self.session.get_providers()
        self._check_device()
        self.output_names = [o.name for o in self.session.get_outputs()]
        graph_in = self.session.get_inputs()[0]
        self.input_name = graph_in.name
        self.input_format = format_of_ort_type(graph_in.type, graph_in.shape)
        self._what = f"the graph {Path(onnx_path).name}"
        self.on_gpu = self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self.io_binding = self.on_gpu if io_binding is None else io_binding
        self._ort = ort
        self._local = (
            threading.local()
        )  # bindings per thread: a Dask worker may run tasks in several

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
            trt_cache = str(self.options.trt_cache_dir or cache_root() / "trt")
            providers.insert(
                0,
                (
                    "TensorrtExecutionProvider",
                    {
                        "device_id": self.options.device_id,
                        # Engines take minutes to build for ViT-B: keep them (keyed by graph and shapes).
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": trt_cache,
                        "trt_timing_cache_enable": True,
                        "trt_timing_cache_path": trt_cache,
                        # The mixed graph is fp16 already; TensorRT's own fp16 would also lower
                        # the softmax and layer norms the mixed graph keeps in fp32.
                        "trt_fp16_enable": False,
                    },
                ),
            )
        return providers

    def _check_device(self) -> None:
        # onnxruntime falls back silently: TensorRT to CUDA, CUDA to the CPU.
        if self.options.tensorrt and self.options.device != "cuda":
            warnings.warn(
                "inference.tensorrt is true but inference.device is cpu: TensorRT runs on CUDA "
                "devices only; running on the CPU without it",
                stacklevel=2,
            )
        if (
            self.options.tensorrt
            and self.options.device == "cuda"
            and "TensorrtExecutionProvider" not in self.providers
        ):
            warnings.warn(
                "inference.tensorrt is true but onnxruntime's TensorRT execution provider did not "
                "load (TensorRT libraries not found?); trying the CUDA execution provider",
                stacklevel=2,
            )
        if self.options.device != "cuda" or "CUDAExecutionProvider" in self.providers:
            return
        msg = (
            "inference.device is cuda but onnxruntime's CUDA execution provider did not load "
            f"(session providers: {self.providers}); onnxruntime-gpu needs matching CUDA and cuDNN "
            "libraries (pip install 'onnxruntime-gpu[cuda,cudnn]'; `vit-attn -v` shows which "
            "library onnxruntime could not load), or set inference.device: cpu"
        )
        if not self.options.allow_cpu_fallback:
            raise BackendError(msg)
        warnings.warn(
            msg + "; running on the CPU because inference.allow_cpu_fallback is true", stacklevel=2
        )

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Named outputs of one batch. With IO binding (GPUs), the arrays are buffers that this
        thread's next batch of the same shape overwrites: copy what must outlive that."""
        batch = check_batch(batch, self.input_format, self._what)
        if not self.io_binding:
            outs = self.session.run(self.output_names, {self.input_name: batch})
            return dict(zip(self.output_names, outs))
        bindings = self._bindings
        binding = bindings.get(batch.shape)
        if binding is None:
            if len(bindings) >= 2:  # full batches and the last, shorter one
                bindings.pop(next(iter(bindings)))
            binding = bindings[batch.shape] = _BatchBinding(self, batch.shape)
        return binding.run(batch)

    def run_tensor(self, pixels) -> dict[str, np.ndarray]:
        """Named outputs of a batch already on the device (a torch tensor, e.g. decoded by
        nvJPEG): IO binding of its memory, no host copy of the input."""
        import torch

        x = pixels.contiguous()
        want = torch.uint8 if self.input_format != FLOAT_NCHW else torch.float32
        if x.dtype != want or x.dim() != 4:
            raise BackendError(
                f"{self._what} takes {self.input_format} batches, got {x.dtype} {list(x.shape)}"
            )
        on_cuda = x.device.type == "cuda"
        if on_cuda != self.on_gpu:
            raise BackendError(
                f"a batch on {x.device} cannot feed a session on {self.providers[0]}; "
                "decode on the inference device"
            )
        binding = self.session.io_binding()
        binding.bind_input(
            self.input_name,
            "cuda" if on_cuda else "cpu",
            x.device.index or 0,
            np.uint8 if want == torch.uint8 else np.float32,
            list(x.shape),
            x.data_ptr(),
        )
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        if on_cuda:
            torch.cuda.current_stream(x.device).synchronize()  # decode done before ORT reads
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))

    @property
    def _bindings(self) -> dict[tuple[int, ...], _BatchBinding]:
        """This thread's bindings: its output buffers are overwritten only by its own next batch."""
        return self._local.__dict__.setdefault("bindings", {})


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,  # the graph's overlays
}


class _BatchBinding:
    """IO binding made once per batch shape: an input buffer on the device, host output buffers.

    A batch is one host-to-device copy into the same device buffer, and each output one copy
    back into the same host array, so nothing is allocated or re-bound per batch. Outputs whose
    shape the graph does not fix beyond the batch axis are bound by device and copied out.
    """

    def __init__(self, runner: OrtRunner, shape: tuple[int, ...]) -> None:
        ort, session = runner._ort, runner.session
        device = "cuda" if runner.on_gpu else "cpu"
        device_id = runner.options.device_id if runner.on_gpu else 0
        self.session = session
        self.binding = session.io_binding()
        self.input = ort.OrtValue.ortvalue_from_shape_and_type(
            list(shape),
            np.float32 if runner.input_format == FLOAT_NCHW else np.uint8,
            device,
            device_id,
        )
        self.binding.bind_ortvalue_input(runner.input_name, self.input)
        self.buffers: dict[str, np.ndarray] = {}
        self.dynamic: list[str] = []
        for out in session.get_outputs():
            dims, dtype = out.shape, _ORT_TYPES.get(out.type)
            if (
                dtype is None
                or not dims
                or isinstance(dims[0], int)
                or not all(isinstance(d, int) for d in dims[1:])
            ):
                self.binding.bind_output(out.name, "cpu")
                self.dynamic.append(out.name)
                continue
            buf = np.empty((shape[0], *dims[1:]), dtype)
            self.binding.bind_output(out.name, "cpu", 0, dtype, list(buf.shape), buf.ctypes.data)
            self.buffers[out.name] = buf
        self.names = [o.name for o in session.get_outputs()]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.input.update_inplace(batch)
        self.session.run_with_iobinding(self.binding)
        if not self.dynamic:
            return {n: self.buffers[n] for n in self.names}
        values = dict(zip(self.names, self.binding.get_outputs()))
        return {n: self.buffers[n] if n in self.buffers else values[n].numpy() for n in self.names}


class TorchRunner:
    """The same wrapper in eager PyTorch: the reference, and a fallback where onnxruntime cannot run."""

    def __init__(self, graph, options: RuntimeOptions, precision: str = "fp32") -> None:
        import torch

        self.torch = torch
        cuda = options.device == "cuda"
        if cuda and not torch.cuda.is_available():
            msg = "inference.device is cuda but torch sees no CUDA device"
            if not options.allow_cpu_fallback:
                raise BackendError(msg + "; set inference.device: cpu")
            if precision == "mixed":  # CUDA autocast: on the CPU it would run fp32, unsaid
                raise BackendError(
                    msg + "; precision 'mixed' with the torch backend needs CUDA, so it cannot "
                    "fall back to the CPU: use backend 'onnxruntime' or precision 'fp32'"
                )
            warnings.warn(  # as the onnxruntime backend does
                msg + "; running on the CPU because inference.allow_cpu_fallback is true",
                stacklevel=2,
            )
            cuda = False
        self.device = torch.device("cuda", options.device_id) if cuda else torch.device("cpu")
        if not cuda and options.threads:
            torch.set_num_threads(options.threads)
        self.graph = graph.to(self.device).eval()
        self.output_names = list(graph.output_names)
        self.input_format = graph.graph_input.format
        self.autocast = precision == "mixed" and self.device.type == "cuda"

    def run_tensor(self, pixels) -> dict[str, np.ndarray]:
        """A batch already in a torch tensor (the device decode path)."""
        with self.torch.inference_mode():
            return self._forward(pixels.to(self.device))

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        batch = check_batch(batch, self.input_format, "the torch backend's graph")
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        return self._forward(x)

    def _forward(self, x) -> dict[str, np.ndarray]:
        torch = self.torch
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast),
        ):
            outs = self.graph(x)
        return {
            n: o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy()
            for n, o in zip(self.output_names, outs)
        }
