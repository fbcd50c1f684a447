"""What each token of a ViT is for, and which attention map stands for the model's output.

Kept free of torch: workers, the store and the renderers read the roles without the model.

A model's sequence is its prefix tokens (roles in `PREFIX_ROLES`, class token first, then a
distillation token or registers), then the patches row-major. Which map is stored depends on
how the model pools its tokens into the output (`POOLINGS`):

- ``cls_attention`` ``A[class, patches]``: only for models that have a class token;
- ``pool_attention``: the softmax of an attention pool's latent queries over the patches
  (timm's ``AttentionPoolLatent``, e.g. SigLIP), the attention that decides the output;
- ``received_attention``: for models with neither, for each patch key the mean over patch
  queries of ``A[query, key]`` (how much attention a patch receives from the patches).

A model without a class token never gets an array named ``cls_attention``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PREFIX_ROLES = ("class", "distillation", "register")
# timm `global_pool` value -> our name. "none": the model returns all tokens (no pooling).
POOLINGS = {
    "token": "class_token",
    "avg": "average",
    "max": "max",
    "avgmax": "average_max",
    "map": "attention_pool",
    "": "none",
}
# The maps a store can hold, in the order that picks the default one for overlays and `show`:
# the attention pool decides the output when there is one, else the class token's row.
MAP_ARRAYS = ("pool_attention", "cls_attention", "received_attention")


def map_arrays(has_class_token: bool, pooling: str) -> tuple[str, ...]:
    """The map arrays a model's store holds, default first (see the module docstring)."""
    maps = []
    if pooling == "attention_pool":
        maps.append("pool_attention")
    if has_class_token:
        maps.append("cls_attention")
    if not maps:
        maps.append("received_attention")
    return tuple(maps)


def default_map(names: Sequence[str] | Mapping[str, Any]) -> str:
    """The map array to show among `names` (array names of a store or batch)."""
    for name in MAP_ARRAYS:
        if name in names:
            return name
    raise KeyError(f"no attention map among {sorted(names)}; expected one of {MAP_ARRAYS}")


def describe_prefix(roles: Sequence[str]) -> str:
    """Prefix roles for people: 'class, register x4' or 'none'."""
    if not roles:
        return "none"
    parts: list[str] = []
    for role in roles:
        if parts and parts[-1].split(" x")[0] == role:
            head, _, count = parts[-1].partition(" x")
            parts[-1] = f"{head} x{int(count or 1) + 1}"
        else:
            parts.append(role)
    return ", ".join(parts)
