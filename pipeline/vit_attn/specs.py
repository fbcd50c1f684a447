"""Values that travel to workers: what model to build and which outputs its graph returns.

Kept free of torch so that onnxruntime workers unpickle their plan without importing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ExportError, ModelError
from .stats import stat_names_for


@dataclass(frozen=True)
class ModelSource:
    """What to build: a timm name plus where its weights come from."""

    name: str
    pretrained: bool = False
    checkpoint: Path | None = None
    seed: int = 0
    img_size: tuple[int, int] | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_weight_source(self.pretrained, self.checkpoint, self.kwargs)


# timm arguments that load weights from a local file: its content would not be part of the
# graph cache's key or the store's fingerprint (only `model.checkpoint` is hashed).
_FILE_KWARGS = ("checkpoint_path", "cache_dir")
_CFG_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay")


def check_weight_source(
    pretrained: bool, checkpoint: object, kwargs: Mapping[str, Any] | None = None
) -> None:
    """Weights come from one place: the hub, a checkpoint, or (neither) a seeded random init.

    The one rule for the config and the API alike. Weights from a file go through
    `model.checkpoint`, which is identified by its content; a file named in `model.kwargs`
    would be identified by nothing, and a changed file would reuse the old graph.
    """
    if pretrained and checkpoint is not None:
        raise ModelError("give either `model.pretrained: true` or `model.checkpoint`, not both")
    for key, value in (kwargs or {}).items():
        if key in _FILE_KWARGS or (
            key in _CFG_KWARGS and isinstance(value, Mapping) and "file" in value
        ):
            where = key if key in _FILE_KWARGS else f"{key}.file"
            raise ModelError(
                f"model.kwargs.{where}: weights from a file go in model.checkpoint (vit-attn "
                "knows a checkpoint by its content, so a changed file is never mistaken for "
                "the old one); remove it from model.kwargs"
            )


def check_layer_selection(layers: object) -> list[int] | None:
    """The form of `attention.layers` before the model is known: 'all' (None), or a non-empty
    list of integer block indices (bools refused: YAML's `true` is not block 1).

    Range checks need the model's depth: `TokenLayout.resolve_layers` does them on top of this.
    """
    if isinstance(layers, str):
        if layers != "all":
            raise ModelError(
                f"attention.layers: expected a list of block indices or 'all', got {layers!r}"
            )
        return None
    items = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    if not isinstance(items, (list, tuple)):
        raise ModelError(
            f"attention.layers: expected a list of block indices or 'all', got {items!r}"[:200]
        )
    if not items:
        raise ModelError(
            "attention.layers: the list is empty; give block indices such as [-1] or 'all'"
        )
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ModelError(
                f"attention.layers: {i!r} is not an integer block index; give a list of "
                "integers such as [-1] or [0, 5, 11], or 'all'"[:300]
            )
    return list(items)


@dataclass(frozen=True)
class OutputSpec:
    """Which outputs the graph returns; `layers` are resolved, ascending block indices.

    `cls_attention` and `rollout` need a class token, `pool_attention` an attention pool
    (`roles`); `class_token` says whether the model has one, which decides the statistics.
    """

    layers: tuple[int, ...]
    logits: bool = True
    topk: int = 5
    cls_attention: bool = True
    attention: bool = False
    rollout: bool = False
    stats: bool = False  # the per-(layer, head) statistics of vit_attn.stats, for `layers`
    received_attention: bool = False
    pool_attention: bool = False
    class_token: bool = True
    # Overlays the graph makes from its uint8 input pixels (vit_attn.overlay_graph): 'none',
    # 'mean' (`overlay`) or 'heads' (also `overlay_heads`), with the blend's alpha and colormap.
    overlays: str = "none"
    overlay_alpha: float = 0.5
    colormap: str = "inferno"
    # The dtype the store keeps maps in: overlays are made from the maps as stored.
    map_dtype: str = "float16"

    @property
    def stat_names(self) -> tuple[str, ...]:
        """The statistics the graph returns: without a class token, the CLS-based ones go."""
        return stat_names_for(self.class_token) if self.stats else ()

    def names(self, has_classifier: bool) -> list[str]:
        names = []
        if has_classifier and self.logits:
            names.append("logits")
        if has_classifier and self.topk > 0:
            names += ["topk_index", "topk_prob"]
        if self.cls_attention:
            names.append("cls_attention")
        if self.pool_attention:
            names.append("pool_attention")
        if self.received_attention:
            names.append("received_attention")
        if self.attention:
            names.append("attention")
        if self.rollout:
            names.append("rollout")
        names += list(self.stat_names)
        if not names:
            raise ExportError(
                "no outputs selected: enable cls_attention, attention, rollout or logits"
            )
        return names


def checkpoint_file(path: Path) -> Path:
    """`model.checkpoint` as a file that can hold weights; else one CheckpointError line."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the weights file in it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; fix model.checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); was it copied whole?")
    return path
