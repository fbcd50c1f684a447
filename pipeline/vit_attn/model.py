"""timm ViT models with their weights, and the token layout every later stage reads.

The layout (prefix tokens, patch grid, heads) is recorded once here: nothing else in the
package assumes CLS-only prefixes, index ``1:`` or a square grid.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ModelError, first_line
from .graphcache import file_sha256
from .hub import offline_if_unreachable
from .layout import TokenLayout
from .roles import POOLINGS
from .specs import ModelSource, checkpoint_file


@dataclass
class LoadedModel:
    """An eval-mode timm model with unfused attention, its layout and a weights identifier."""

    model: nn.Module
    layout: TokenLayout
    weights: str
    source: ModelSource


def attention_modules(model: nn.Module) -> list[Any]:
    """The per-layer attention modules whose `attn_drop` receives the softmax probabilities:
    each transformer block's, or for CaiT each class-attention block's (`blocks_token_only`)."""
    blocks = getattr(model, "blocks_token_only", None) or getattr(model, "blocks", None)
    if blocks is None:
        return []
    found = []
    for block in blocks:
        attn = getattr(block, "attn", None)
        if attn is None or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
            return []
        found.append(attn)
    return found


def _disable_fused_attention(model: nn.Module) -> None:
    # timm reads the fused flag at build time; SDPA never materialises the softmax, so each
    # module is switched to the explicit path that computes it.
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            setattr(module, "fused_attn", False)  # noqa: B010 - typed as a Tensor/Module union


def _to_pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def token_layout(model: nn.Module) -> TokenLayout:
    """Read the layout and token roles from a built timm ViT; refuse what has no token maps."""
    name = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
    _refuse_unsupported_families(model, name)
    attns = attention_modules(model)
    if not attns:
        raise ModelError(
            f"model {name!r} has no transformer blocks with an attention softmax to capture "
            "(expected `model.blocks[i].attn.attn_drop`, as in timm's vit_*, deit_*, eva*, *_reg* models); "
            "choose a ViT-family model"
        )
    patch_embed = getattr(model, "patch_embed", None)
    grid = getattr(patch_embed, "grid_size", None)
    img_size = getattr(patch_embed, "img_size", None)
    # A `dynamic_img_size` model still has a default grid: the pipeline feeds it that size.
    if grid is None or img_size is None:
        raise ModelError(
            f"model {name!r} has no fixed patch grid (patch_embed.grid_size); use a fixed-size ViT"
        )
    _check_whole_patches(name, _to_pair(img_size), _to_pair(getattr(patch_embed, "patch_size", 1)))
    grid, img_size = _to_pair(grid), _to_pair(img_size)
    prefix_roles = _prefix_roles(model, name)
    pooling, pool_latents, pool_heads = _pooling(model, name, prefix_roles)
    first: Any = attns[0]
    num_heads = int(first.num_heads)
    return TokenLayout(
        num_prefix_tokens=len(prefix_roles),
        patch_size=_token_stride(patch_embed, grid, img_size, name),
        grid=grid,
        input_size=img_size,
        depth=len(attns),
        num_heads=num_heads,
        # timm makes no classifier (an Identity head) for num_classes <= 0
        num_classes=max(int(getattr(model, "num_classes", 0) or 0), 0),
        prefix_roles=prefix_roles,
        pooling=pooling,
        pool_latents=pool_latents,
        pool_heads=pool_heads,
        layer_kind="class_attention"
        if getattr(model, "blocks_token_only", None)
        else "self_attention",
    )


def _check_whole_patches(name: str, size: tuple[int, int], patch: tuple[int, int]) -> None:
    """Refuse an input size the patches do not tile: the model would ignore the last pixels
    while overlays stretch the grid over them."""
    for side, p in zip(size, patch):
        if side % p:
            below = side - side % p
            fits = " or ".join(str(x) for x in (below, below + p) if x >= p)  # never 0
            raise ModelError(
                f"model {name!r}: img_size {list(size)} is not a multiple of the patch size "
                f"{list(patch)} (the last {side % p} px would not be covered by whole patches: "
                f"the model drops them, or pads them with dynamic_img_pad); use {fits}"
            )


def _refuse_unsupported_families(model: nn.Module, name: str) -> None:
    """Families whose captured softmax is not token attention: one line saying why."""
    if hasattr(model, "blocks_token_only") and not model.blocks_token_only:
        raise ModelError(
            f"model {name!r} (CaiT) has no class-attention blocks: its maps come from them, "
            "and its other blocks' talking-heads attention mixes heads after the softmax, so "
            "what they compute is not a probability map; build it with depth_token_only >= 1 "
            "(timm's CaiT models have 2)"
        )
    blocks = getattr(model, "blocks", None) or ()
    kinds = {type(getattr(b, "attn", None)).__name__ for b in blocks}
    if "DiffAttention" in kinds:
        raise ModelError(
            f"model {name!r} (differential attention) is not supported: each head subtracts "
            "one softmax from another, so what it computes is not a probability map over the "
            "tokens; use a ViT, DeiT, EVA or BEiT model"
        )
    if "XCA" in kinds:
        raise ModelError(
            f"model {name!r} (XCiT) is not supported: its patch blocks' cross-covariance "
            "attention is a softmax across feature channels, not tokens, and its "
            "class-attention blocks (the only token softmax) are not captured by vit-attn; "
            "use a ViT, DeiT, EVA, BEiT or CaiT model"
        )
    if type(model).__name__ == "VisionTransformerSAM":
        raise ModelError(
            f"model {name!r} (SAM's image encoder) is not supported: most of its blocks "
            "attend within windows of the patch grid, not over all tokens, so a block's map "
            "is not one attention over the image; use a ViT, DeiT, EVA or BEiT model"
        )
    block_kinds = {type(b).__name__ for b in blocks}
    if block_kinds & {"ParallelScalingBlock", "ParallelThingsBlock"}:
        raise ModelError(
            f"model {name!r} (parallel blocks) is not supported: its blocks compute attention "
            "inline, with no attention module whose softmax vit-attn can capture; use a ViT "
            "with sequential blocks"
        )
    local = getattr(model, "local_up_to_layer", None)
    if isinstance(local, int) and local >= len(blocks):
        raise ModelError(
            f"model {name!r} (ConViT) has no block after its class token joins "
            f"(local_up_to_layer {local} >= depth {len(blocks)}): every block is gated "
            "positional self-attention over the patches alone; build it with more blocks "
            "than local_up_to_layer"
        )


def _prefix_roles(model: nn.Module, name: str) -> tuple[str, ...]:
    """Class token, distillation token, registers: in timm's order, checked against the count."""
    has_class: Any = getattr(model, "has_class_token", None)
    if has_class is None:
        has_class = getattr(model, "cls_token", None) is not None
    distill = 1 if getattr(model, "dist_token", None) is not None else 0
    registers = getattr(model, "num_reg_tokens", None)
    if registers is None:
        reg_token = getattr(model, "reg_token", None)
        registers = int(reg_token.shape[1]) if reg_token is not None else 0
    roles = ("class",) * int(bool(has_class)) + ("distillation",) * distill
    roles += ("register",) * int(registers)
    count = int(getattr(model, "num_prefix_tokens", len(roles)))
    if count != len(roles):
        raise ModelError(
            f"model {name!r} has {count} prefix tokens, of which only {len(roles)} have a known "
            f"role ({', '.join(roles) or 'none'}); its maps cannot be labelled, so it is not supported"
        )
    return roles


def _pooling(model: nn.Module, name: str, roles: tuple[str, ...]) -> tuple[str, int, int]:
    """How the model pools tokens into its output: (pooling, latent queries, pool heads)."""
    from timm.layers import AttentionPoolLatent

    pool: Any = getattr(model, "attn_pool", None)
    if pool is not None:
        if not isinstance(pool, AttentionPoolLatent):
            raise ModelError(
                f"model {name!r} pools with {type(pool).__name__}, whose attention is not "
                "captured; use global_pool 'token', 'avg' or 'map' (model.kwargs)"
            )
        return "attention_pool", int(pool.latent_len), int(pool.num_heads)
    global_pool = getattr(model, "global_pool", None)
    if global_pool is None:  # a class without the attribute: it reads the class token if any
        return ("class_token" if roles[:1] == ("class",) else "none"), 0, 0
    if global_pool not in POOLINGS or global_pool == "map":
        raise ModelError(
            f"model {name!r} has global_pool {global_pool!r}, which is not understood; "
            f"use one of {sorted(k for k in POOLINGS if k)} or '' (model.kwargs)"
        )
    return POOLINGS[global_pool], 0, 0


def _token_stride(
    patch_embed: Any, grid: tuple[int, int], img_size: tuple[int, int], name: str
) -> tuple[int, int]:
    """Pixels between neighbouring tokens: input size / grid (a hybrid stem's stride is not
    `patch_embed.patch_size`); the patch size where the input does not divide evenly."""
    patch = _to_pair(getattr(patch_embed, "patch_size", 0) or 0)
    stride = []
    for size, cells, p in zip(img_size, grid, patch):
        if size % cells == 0:
            stride.append(size // cells)
        elif p and size // p == cells:
            stride.append(p)
        else:
            raise ModelError(
                f"model {name!r}: a {img_size[0]}x{img_size[1]} input gives a {grid[0]}x{grid[1]} "
                "token grid with no whole-pixel stride; choose model.img_size divisible by the stride"
            )
    return (stride[0], stride[1])


def _what(exc: BaseException) -> str:
    """`Type: message`, or the type alone when the message is empty (an EOFError)."""
    line = first_line(exc)
    name = type(exc).__name__
    return name if line == name else f"{name}: {line}"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint without running code from it (safetensors, or torch.load weights_only)."""
    path = checkpoint_file(path)
    state: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # every reader raises its own type for a corrupt file
        if "arbitrary code execution" in str(exc):  # torch's weights_only refusal: say why
            raise CheckpointError(
                f"checkpoint {path} holds more than tensors and was not loaded: loading it could "
                "result in arbitrary code execution; convert it to safetensors where it was made, "
                "or load only weights you trust"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({_what(exc)}); "
            "is it truncated or not a weights file?"
        ) from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _apply_checkpoint(model: nn.Module, path: Path) -> None:
    state = read_state_dict(path)
    # timm's own filter resamples position embeddings when img_size differs from training.
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as exc:
            # timm's filter fails on what it cannot resample ("tuple index out of range" for
            # a 1-d pos_embed): the keys and shapes that differ say more, where some do
            why = _state_mismatch(model, state) or first_line(exc)
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: {why} "
                "(check model.name and model.kwargs)"
            ) from None
    _check_dtypes(model, state, path)
    mismatch = _state_mismatch(model, state)
    if mismatch:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: {mismatch} "
            "(check model.name and model.kwargs)"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: {first_line(exc)} "
            "(check model.name and model.kwargs)"
        ) from None


def _state_mismatch(model: nn.Module, state: dict[str, torch.Tensor], shown: int = 3) -> str:
    """What differs between a checkpoint and the model, in words: the keys missing from the
    checkpoint, the keys it has that the model does not, tensors of another shape (a few of
    each, with counts). torch's own message puts these after its first line, which is all
    a one-line error could show."""
    own = model.state_dict()

    def some(keys: list[str]) -> str:
        more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
        return ", ".join(keys[:shown]) + more

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({some(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape ({some(shapes)})")
    return "; ".join(parts)


def _check_dtypes(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """A float parameter must come from a float tensor: load_state_dict would silently cast
    int8 (quantized) values, giving a model of garbage weights."""
    own = model.state_dict()
    for key, tensor in state.items():
        target = own.get(key)
        if target is not None and target.is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(
                f"checkpoint {path}: {key} is {str(tensor.dtype).removeprefix('torch.')}, "
                f"the model needs {str(target.dtype).removeprefix('torch.')} (quantized "
                "checkpoints are not supported; save the float weights)"
            )


def _create(source: ModelSource) -> nn.Module:
    import timm

    kwargs = dict(source.kwargs)
    if source.img_size is not None:
        kwargs["img_size"] = source.img_size
    if not timm.is_model(source.name):
        raise ModelError(
            f"model.name {source.name!r} is not a timm model; see timm.list_models('vit_*')"
        )
    offline: str | None = None
    try:
        if not source.pretrained:
            return timm.create_model(source.name, pretrained=False, **kwargs)
        with offline_if_unreachable() as offline:
            return timm.create_model(source.name, pretrained=True, **kwargs)
    except (TypeError, AssertionError) as exc:  # timm asserts e.g. dim % num_heads == 0
        raise ModelError(
            f"model {source.name!r} rejects the given arguments ({first_line(exc)}); "
            "check model.kwargs"
        ) from None
    except (OSError, RuntimeError, ValueError) as exc:
        if source.pretrained and offline is not None:
            raise ModelError(
                f"pretrained weights for {source.name!r} are not in the Hugging Face cache and "
                f"the hub is not reachable ({offline}); fetch them on a machine with access "
                "(HF_HOME names the cache), or use model.checkpoint"
            ) from None
        if source.pretrained:
            raise ModelError(
                f"pretrained weights for {source.name!r} could not be loaded ({first_line(exc)}); "
                "offline? put them in the Hugging Face cache (HF_HUB_OFFLINE=1) or use model.checkpoint"
            ) from None
        raise ModelError(f"model {source.name!r} cannot be built: {first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. patch_size=0 (ZeroDivisionError), act_layer=nope (KeyError)
        raise ModelError(
            f"model {source.name!r} cannot be built with model.kwargs "
            f"{dict(source.kwargs)} ({type(exc).__name__}: {first_line(exc)}); check model.kwargs"
        ) from None


def _check_finite(model: nn.Module, weights: str) -> None:
    """NaN or inf in the weights make NaN attention for every image: refuse them up front."""
    bad = {
        name: int((~torch.isfinite(t)).sum())
        for name, t in model.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    }
    if bad:
        first = next(iter(bad))
        where = weights.split(":", 1)[0]
        raise ModelError(
            f"the model's {where} weights hold {sum(bad.values()):,} values that are NaN or "
            f"infinite ({len(bad)} tensors, first {first}): every map would be NaN; use "
            "an intact checkpoint"
        )


def load_model(source: ModelSource) -> LoadedModel:
    """Build the model in eval mode with explicit (capturable) attention and load its weights."""
    channels = source.kwargs.get("in_chans", 3)
    if channels != 3:
        raise ModelError(
            f"model.kwargs.in_chans {channels!r}: vit-attn feeds the model RGB images (3 "
            "channels); leave in_chans out"
        )
    if source.pretrained:
        weights = "pretrained"
        model = _create(source)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(source.seed)
            model = _create(source)
        if source.checkpoint is not None:
            _apply_checkpoint(model, Path(source.checkpoint))
            weights = f"checkpoint:{file_sha256(Path(source.checkpoint))}"
        else:
            weights = f"random:{source.seed}"
    _check_finite(model, weights)
    _disable_fused_attention(model)
    model.eval()
    layout = token_layout(model)
    return LoadedModel(model=model, layout=layout, weights=weights, source=source)


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """The `model` attribute of a store: what a reader needs to interpret its arrays."""
    lay = loaded.layout
    return {
        "name": loaded.source.name,
        "weights": loaded.weights,
        "kwargs": json.loads(json.dumps(dict(loaded.source.kwargs))),
        "patch_size": list(lay.patch_size),
        "depth": lay.depth,
        "num_heads": lay.num_heads,
        "num_prefix_tokens": lay.num_prefix_tokens,
        "grid": list(lay.grid),
        "input_size": [3, *lay.input_size],
        "num_classes": lay.num_classes,
        # Only for CaiT, so that the fingerprints of other stores stay valid.
        **({"layer_kind": lay.layer_kind} if lay.class_queries_only else {}),
    }
