"""The attention-exposing wrapper and its ONNX export, cached on disk by fingerprint.

The wrapper computes what users keep (CLS, pool or received maps, rollout, top-k, statistics)
inside the graph, so the full ``[B, L, H, T, T]`` matrices leave the runtime only when they are
asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import traceback
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .cachedir import cache_root
from .errors import ExportError, ModelError, PipelineError, first_line
from .filemode import as_if_opened
from .graphcache import code_digest, package_version
from .graphinput import UINT8_NHWC, GraphInput
from .layout import class_attention_refusal
from .model import LoadedModel, attention_modules
from .overlay import colormap_lut
from .overlay_graph import OverlayGraph
from .specs import OutputSpec
from .stats import graph_stats
from .variant import FULL, FUSED, OPSET, PLAIN, ROWS, check_capture
from .variant import check as check_variant

log = logging.getLogger(__name__)

INPUT_NAME = "pixel_values"
PRECISIONS = ("fp32", "mixed")
EXPORT_FORMAT_VERSION = 5  # bump when the wrapper's graph changes for the same spec


class PixelNormalize(nn.Module):
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W], ``(x / 255 - mean) / std`` in the graph.

    The same float32 steps, in the same order, as `vit_attn.decode.normalize` (torchvision's
    ToTensor + Normalize), so the graph's tensor equals the host's to float rounding.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32)
        return (x / 255.0 - self.mean) / self.std


class _StopForward(Exception):
    """Raised in eager torch by the last needed capture when nothing after it is needed: the
    model's forward ends there, without the rest of that block (attention output, projection,
    MLP). Never while exporting: the tracer's module stack does not survive an exception, and
    the exporter drops those nodes anyway, since no output uses them (tests count the nodes)."""


def _tracing() -> bool:
    return bool(torch.compiler.is_exporting() or torch.compiler.is_compiling())


def rows_capturable(attn: nn.Module) -> bool:
    """Whether a block's probabilities can be computed from its own q and k rows alone.

    Only timm's plain `Attention` (ViT, DeiT, DINOv2, CLIP, SigLIP, ...): its softmax is of
    ``(q * scale) @ k^T`` and nothing else. Look-alikes add terms inside the softmax (EVA's and
    PE's rope, BEiT's relative position bias; BEiT's class is even named `Attention`), so the
    test is the exact class, never its name or a subclass.
    """
    from timm.layers.attention import Attention

    return type(attn) is Attention


class AttentionGraph(nn.Module):
    """Returns the selected outputs of a timm ViT; the same module serves export and the torch backend.

    Captured blocks compute only the probabilities that are stored (`capture="rows"`): with
    `cls_attention` alone, the CLS query row ``[B, H, 1, T]``, as
    ``softmax((q[:, :, :1] * scale) @ k^T)`` from forward hooks on the block's ``attn.q_norm``
    and ``attn.k_norm`` (`rows_capturable` blocks), while the block's own output runs the
    variant's kernel like any other block. Full attention, rollout, statistics and received
    attention need every row: forward hooks on those blocks' ``attn.attn_drop`` see its input,
    the whole softmax (dropout is the identity in eval mode), as do blocks that are not
    `rows_capturable` and every captured block with `capture="full"`. When nothing after the
    last captured block is needed (no classifier outputs, no attention pool), no later block
    runs, and that block computes nothing after its capture: its q and k rows only, when rows
    are captured (`_StopForward`). For an attention pool, hooks on its ``q_norm`` and ``k_norm``
    see the pool's own latent queries and keys, and the graph takes the pool's softmax of them
    (timm's `AttentionPoolLatent` has no dropout to hook).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        spec: OutputSpec,
        graph_input: GraphInput | None = None,
        attention: str = PLAIN,
        capture: str = ROWS,
    ) -> None:
        """`attention`: `fused` keeps timm's SDPA in the blocks whose whole softmax is not
        captured (`vit_attn.variant`); `plain` computes the softmax in every block.
        `capture`: `rows` computes only the stored query rows; `full` every captured block's
        whole softmax (the graphs before the rows capture; kept for comparisons)."""
        super().__init__()
        self.attention = check_variant(attention)
        self.capture = check_capture(capture)
        self.graph_input = graph_input or GraphInput()
        self.pixels = (
            PixelNormalize(self.graph_input.mean, self.graph_input.std)
            if self.graph_input.format == UINT8_NHWC
            else None
        )
        self.vit: Any = loaded.model  # a timm ViT: attributes are read by name
        self.layout = loaded.layout
        self.spec = spec
        _check_spec_fits_model(loaded, spec)
        self.output_names = spec.names(self.layout.num_classes > 0)
        # Overlays blend the graph's own uint8 pixels: a float32-input graph has none.
        self.overlays = (
            OverlayGraph(spec, self.layout, self.output_names)
            if self.pixels is not None and spec.overlays != "none"
            else None
        )
        if self.overlays is not None:
            self.output_names = [*self.output_names, *self.overlays.names]
        need_classifier = any(n in self.output_names for n in ("logits", "topk_index"))
        lay = self.layout
        all_rows = spec.attention or spec.stats or spec.received_attention or spec.rollout
        # Query rows each captured block computes: all, the CLS row, or none (a store of
        # pool maps alone needs no block's probabilities).
        self.query_rows = (
            lay.num_tokens if all_rows or capture == FULL else 1 if spec.cls_attention else 0
        )
        if lay.class_queries_only:  # CaiT: the class token is the layers' only query
            self.query_rows = min(self.query_rows, 1)
        if spec.rollout:
            self.captured_blocks: tuple[int, ...] = tuple(range(lay.depth))
        else:
            self.captured_blocks = spec.layers if self.query_rows else ()
        # Without classifier outputs, nothing after the last needed block is computed; the
        # attention pool sits after every block, so it needs the whole forward.
        self.stop_block = (
            None
            if need_classifier
            or spec.pool_attention
            or not self.captured_blocks
            or lay.class_queries_only  # CaiT's class-attention blocks have no early stop
            else max(self.captured_blocks)
        )
        self._active = False
        self._captures: dict[int, torch.Tensor] = {}
        self._shapes: dict[int, tuple[int, ...]] = {}
        self._queries: dict[int, torch.Tensor] = {}
        self._pool: dict[str, torch.Tensor] = {}
        self._attns: list[Any] = attention_modules(self.vit)
        partial = self.capture == ROWS and self.query_rows < lay.num_tokens
        # Blocks whose stored rows come from q and k; the others' whole softmax is captured.
        self.rows_blocks = tuple(
            i for i in self.captured_blocks if partial and rows_capturable(self._attns[i])
        )
        for i in self.captured_blocks:
            attn = self._attns[i]
            if i in self.rows_blocks:
                attn.register_forward_pre_hook(self._unmasked_hook(i), with_kwargs=True)
                attn.q_norm.register_forward_hook(self._query_hook(i))
                attn.k_norm.register_forward_hook(self._key_hook(i))
            else:
                attn.attn_drop.register_forward_hook(self._softmax_hook(i))
        if spec.pool_attention:
            pool: Any = self.vit.attn_pool
            pool.q_norm.register_forward_hook(self._pool_hook("q"))
            pool.k_norm.register_forward_hook(self._pool_hook("k"))

    def _pool_hook(self, key: str):
        def capture(
            module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> None:
            if self._active:
                self._pool[key] = output

        return capture

    def _store(self, index: int, probs: torch.Tensor, shape: tuple[int, ...]) -> None:
        self._captures[index] = probs
        self._shapes[index] = shape
        if index == self.stop_block and not _tracing():
            raise _StopForward

    def _softmax_hook(self, index: int):
        def capture(
            module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> None:
            if not self._active:
                return
            probs = args[0]
            self._store(index, probs[:, :, : self.query_rows], tuple(probs.shape[1:]))

        return capture

    def _unmasked_hook(self, index: int):
        def check(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            masked = kwargs.get("attn_mask") is not None or kwargs.get("is_causal", False)
            if self._active and masked:
                raise ModelError(
                    f"block {index}'s attention is called with a mask, which the captured "
                    "rows would not apply; the model is not supported"
                )

        return check

    def _query_hook(self, index: int):
        def capture(module: nn.Module, args: tuple[torch.Tensor, ...], q: torch.Tensor) -> None:
            if self._active:
                self._queries[index] = q

        return capture

    def _key_hook(self, index: int):
        attn = self._attns[index]

        def capture(module: nn.Module, args: tuple[torch.Tensor, ...], k: torch.Tensor) -> None:
            if not self._active:
                return
            # timm's own steps for the rows kept: (q * scale) @ k^T, softmax over the keys.
            q = self._queries.pop(index)
            logits = (q[:, :, : self.query_rows] * attn.scale) @ k.transpose(-2, -1)
            self._store(index, logits.softmax(dim=-1), (q.shape[1], q.shape[2], k.shape[2]))

        return capture

    def _run_model(self, x: torch.Tensor) -> torch.Tensor | None:
        # Hooks act only while this wrapper runs the model: another wrapper of the same model
        # (tests, benchmarks) must not capture into this one, nor be stopped by it.
        self._active = True
        try:
            if self.stop_block is None:
                out = self.vit(x)
                return out if self.layout.num_classes > 0 else None
            if hasattr(self.vit, "forward_intermediates"):
                self.vit.forward_intermediates(
                    x, indices=[self.stop_block], stop_early=True, intermediates_only=True
                )
            else:
                self.vit.forward_features(x)
        except _StopForward:
            pass
        finally:
            self._active = False
        return None

    def _set_kernels(self) -> None:
        # Per forward, not once: several wrappers may share one model (tests, benchmarks).
        fused = self.attention == FUSED
        whole = set(self.captured_blocks) - set(self.rows_blocks)
        for i, attn in enumerate(self._attns):
            if hasattr(attn, "fused_attn"):
                attn.fused_attn = fused and i not in whole

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._captures.clear()
        self._shapes.clear()
        self._queries.clear()
        self._set_kernels()
        pixels = pixel_values
        if self.pixels is not None:
            pixel_values = self.pixels(pixel_values)
        logits = self._run_model(pixel_values)
        missing = [i for i in self.captured_blocks if i not in self._captures]
        if missing:
            raise ExportError(
                f"attention of blocks {missing} was not captured; is fused attention still on?"
            )
        lay = self.layout
        p = lay.num_prefix_tokens
        batch = pixel_values.shape[0]
        queries = 1 if lay.class_queries_only else lay.num_tokens
        for i in self.captured_blocks:
            shape = self._shapes[i]
            if shape != (lay.num_heads, queries, lay.num_tokens):
                raise ModelError(
                    f"block {i}'s attention has shape {list(shape)}, not [heads={lay.num_heads}, "
                    f"queries={queries}, tokens={lay.num_tokens}]: it is not attention over "
                    "this model's tokens, so the model is not supported"
                )
        out: dict[str, torch.Tensor] = {}
        if logits is not None:
            out["logits"] = logits
            if "topk_index" in self.output_names:
                k = min(self.spec.topk, lay.num_classes)
                probs, index = torch.topk(logits.softmax(dim=-1), k, dim=-1)
                out["topk_index"], out["topk_prob"] = index, probs
        # [B, layers, H, query_rows, T]: the CLS row alone, or every row (None: no block's
        # probabilities are stored, only the attention pool's).
        selected = (
            torch.stack([self._captures[i] for i in self.spec.layers], dim=1)
            if self.query_rows
            else None
        )
        gh, gw = lay.grid
        if self.spec.cls_attention:
            assert selected is not None
            out["cls_attention"] = selected[:, :, :, 0, p:].reshape(
                batch, len(self.spec.layers), lay.num_heads, gh, gw
            )
        if self.spec.received_attention:
            assert selected is not None and self.query_rows == lay.num_tokens
            # For each patch key: the mean over the patch queries of A[query, key].
            out["received_attention"] = (
                selected[:, :, :, p:, p:]
                .mean(dim=-2)
                .reshape(batch, len(self.spec.layers), lay.num_heads, gh, gw)
            )
        if self.spec.pool_attention:
            out["pool_attention"] = self._pool_attention(batch)
        if self.spec.attention:
            assert selected is not None and self.query_rows == lay.num_tokens
            out["attention"] = selected
        if self.spec.rollout:
            out["rollout"] = rollout_torch(
                [self._captures[i] for i in range(lay.depth)], p, lay.grid
            )
        if self.spec.stats:
            # Per block, then stacked: the [B, H, T, T] temporaries stay one layer large.
            per_block = [
                graph_stats(self._captures[i], p, lay.grid, lay.patch_size, self.spec.class_token)
                for i in self.spec.layers
            ]
            for name in self.spec.stat_names:
                out[name] = torch.stack([s[name] for s in per_block], dim=1)
        if self.overlays is not None:
            out.update(self.overlays(pixels, out))
        self._captures.clear()
        self._shapes.clear()
        self._pool.clear()
        return tuple(out[n] for n in self.output_names)

    def _pool_attention(self, batch: int) -> torch.Tensor:
        """The attention pool's softmax over the patch keys: [B, H, gh, gw] or [B, latents, H, gh, gw].

        The pool's own q (after q_norm) and k (after k_norm), scaled and softmaxed over every
        key the pool sees as it does itself; then the patch keys are kept (a pool that also
        sees prefix tokens puts some mass on them, as a CLS row does).
        """
        if set(self._pool) != {"q", "k"}:
            raise ExportError("the attention pool's queries and keys were not captured")
        lay = self.layout
        pool: Any = self.vit.attn_pool
        attn = ((self._pool["q"] * pool.scale) @ self._pool["k"].transpose(-2, -1)).softmax(-1)
        keys = attn.shape[-1]
        if keys == lay.num_tokens:
            attn = attn[..., lay.num_prefix_tokens :]
        elif keys != lay.num_patches:
            raise ModelError(
                f"the attention pool sees {keys} tokens, neither the {lay.num_tokens} tokens "
                f"nor the {lay.num_patches} patches; the model is not supported"
            )
        # [B, heads, latents, N] -> [B, latents, heads, gh, gw] (the pool's own head count)
        attn = attn.transpose(1, 2).reshape(batch, -1, attn.shape[1], *lay.grid)
        return attn[:, 0] if lay.pool_latents == 1 else attn


def _check_spec_fits_model(loaded: LoadedModel, spec: OutputSpec) -> None:
    """Maps that would mislabel attention are refused: no CLS map without a class token."""
    lay, name = loaded.layout, loaded.source.name
    if not lay.has_class_token:
        if spec.cls_attention or spec.rollout:
            what = "cls_attention" if spec.cls_attention else "rollout (the CLS row of the product)"
            raise ModelError(
                f"model {name!r} has no class token ({lay.pooling} pooling), so it has no "
                f"{what}; its maps are {', '.join(lay.maps)}"
            )
        if spec.stats and spec.class_token:
            raise ModelError(
                f"model {name!r} has no class token: its statistics need class_token=False"
            )
    if lay.class_queries_only and (spec.attention or spec.rollout or spec.stats):
        raise ModelError(class_attention_refusal(name))
    if spec.pool_attention and lay.pooling != "attention_pool":
        raise ModelError(f"model {name!r} has no attention pool ({lay.pooling} pooling)")
    local = getattr(loaded.model, "local_up_to_layer", None)
    if not isinstance(local, int):
        return
    if any(i < local for i in spec.layers) or (local > 0 and spec.rollout):
        raise ModelError(
            f"model {name!r} (ConViT): blocks 0-{local - 1} are gated positional "
            "self-attention over the patches alone (the class token joins at block "
            f"{local}), a mix of two softmaxes, not attention over the model's tokens; store "
            f"blocks {local} and later (attention.layers), without rollout"
        )


def rollout_torch(
    attentions: list[torch.Tensor], num_prefix: int, grid: tuple[int, int]
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema): head mean, add identity, row-normalise, multiply up."""
    joint = None
    for attn in attentions:
        a = attn.mean(dim=1)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint
    assert joint is not None
    return joint[:, 0, num_prefix:].reshape(joint.shape[0], grid[0], grid[1])


def weights_digest(model: nn.Module) -> str:
    """A hash of every parameter and buffer, so any change of weights makes a new graph."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        # reshape first: a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed
        # as bytes of another size; the bytes of every other tensor are the same as before
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def export_fingerprint(
    loaded: LoadedModel,
    spec: OutputSpec,
    precision: str,
    graph_input: GraphInput | None = None,
    attention: str = PLAIN,
    capture: str = ROWS,
) -> str:
    """Digest of everything that changes the exported graph."""
    import timm

    payload = {
        "format": EXPORT_FORMAT_VERSION,
        "name": loaded.source.name,
        "kwargs": dict(loaded.source.kwargs),
        "weights": weights_digest(loaded.model),
        "layout": loaded.layout.to_dict(),
        "spec": asdict(spec),
        # The colour table itself (matplotlib's), not only its name, when the graph blends.
        "colormap_lut": (
            hashlib.sha256(colormap_lut(spec.colormap).tobytes()).hexdigest()
            if spec.overlays != "none"
            else None
        ),
        "precision": precision,
        "input": asdict(graph_input or GraphInput()),
        "attention": attention,
        "capture": capture,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnx": package_version("onnx"),  # the mixed graph's conversion (onnxscript too)
        "onnxscript": package_version("onnxscript"),
        "vit_attn": __version__,
        "code": code_digest(),  # the modules that build the graph, as the record's key has it
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def export_onnx(
    loaded: LoadedModel,
    spec: OutputSpec,
    precision: str = "fp32",
    cache_dir: Path | None = None,
    graph_input: GraphInput | None = None,
    attention: str = PLAIN,
    capture: str = ROWS,
    reuse: bool = True,
) -> Path:
    """Return the path of the ONNX graph for this model/spec/precision, exporting it if not cached.

    `reuse=False` exports even when a file has the graph's name, and replaces it: the run's
    model record (`vit_attn.graphcache`) asks so when no record vouches for the file.

    `graph_input`: what the graph takes (`vit_attn.graphinput`); default the model's own
    float32 NCHW input, the pipeline passes uint8 NHWC pixels. `attention`: the kernel of the
    blocks whose whole softmax is not captured; `capture`: only the stored query rows (`rows`,
    what the pipeline exports) or every captured block's whole softmax (`full`), see
    `vit_attn.variant`.
    """
    check_variant(attention)
    check_capture(capture)
    graph_input = graph_input or GraphInput()
    if precision not in PRECISIONS:
        raise ExportError(f"inference.precision must be one of {PRECISIONS}, got {precision!r}")
    cache_dir = cache_root(cache_dir)
    digest = export_fingerprint(loaded, spec, precision, graph_input, attention, capture)
    tag = ("" if attention == PLAIN else f"-{attention}") + (
        "" if capture == ROWS else f"-{capture}"
    )
    path = cache_dir / "onnx" / f"{loaded.source.name}-{precision}{tag}-{digest[:20]}.onnx"
    if reuse and path.is_file():
        log.info("export cache hit: %s", path)
        with contextlib.suppress(OSError):  # last use, for `vit-attn cache --prune`
            os.utime(path)
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(
            f"cannot create the export cache folder {path.parent}: {exc.strerror}; set "
            "inference.cache_dir or VIT_ATTN_CACHE to a writable folder"
        ) from None
    graph = AttentionGraph(loaded, spec, graph_input, attention, capture).eval()
    try:
        fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    except OSError as exc:  # a read-only cache: a hit works, a miss must be written somewhere
        raise ExportError(
            f"cannot write a new graph into the export cache {path.parent}: {exc.strerror}; "
            "set inference.cache_dir or VIT_ATTN_CACHE to a writable folder"
        ) from None
    os.close(fd)
    as_if_opened(tmp_name)  # not mkstemp's 0600: a cache shared by a group stays readable
    tmp = Path(tmp_name)
    try:
        _export(graph, tmp, loaded.layout.input_size)
        if precision == "mixed":
            _convert_mixed(tmp)
        os.replace(tmp, path)  # atomic: concurrent exporters never see a partial file
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s", path)
    return path


def _export(graph: AttentionGraph, path: Path, input_size: tuple[int, int]) -> None:
    shape = graph.graph_input.example_shape(2, input_size)
    if graph.pixels is not None:
        example = torch.randint(0, 256, shape, dtype=torch.uint8)
    else:
        example = torch.randn(*shape)
    opset = OPSET[graph.attention]
    batch = torch.export.Dim("batch", min=1, max=65536)
    chatter = io.StringIO()  # the exporter prints progress lines; keep them for failures only
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=graph.output_names,
                dynamic_shapes=({0: batch},),
                external_data=False,
                dynamo=True,
                verbose=False,
                opset_version=opset,
            )
    except PipelineError:
        raise
    except Exception as exc:
        cause = root_cause(exc)
        log.info(
            "exporter output:\n%s\n%s",
            chatter.getvalue(),
            "".join(traceback.format_exception(exc)),
        )
        if isinstance(cause, PipelineError):
            raise cause from None  # our own check, raised while tracing: already one clear line
        name = getattr(graph.vit, "default_cfg", {}).get("architecture", type(graph.vit).__name__)
        raise ExportError(
            f"ONNX export of {name!r} failed: {one_line(cause)} (vit-attn -v shows the exporter's log)"
        ) from None


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain: the exporter wraps the real error in its own."""
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or exc.__context__
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def one_line(exc: BaseException) -> str:
    """`Type: first line` of an exception, without terminal colour codes (errors.first_line)."""
    return f"{type(exc).__name__}: {first_line(exc)}"[:300]


def _convert_mixed(path: Path) -> None:
    import onnx

    from .precision import scope_selector, to_mixed

    model = onnx.load(str(path))
    # The classifier head stays fp32 so logits and top-k keep full precision.
    keep = scope_selector("vit", fp32_modules=("head", "fc_norm", "head_drop"))
    onnx.save(to_mixed(model, keep), str(path))
