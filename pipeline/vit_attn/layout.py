"""Where each token sits in a ViT's sequence, kept free of torch.

The layout is read once from the built model (`vit_attn.model.token_layout`) and then travels
as plain data: the export cache keeps it as JSON beside the graph (`vit_attn.graphcache`), so a
run whose graph is cached never imports torch to learn it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import ModelError
from .roles import POOLINGS, PREFIX_ROLES, map_arrays
from .specs import check_layer_selection

LAYER_KINDS = ("self_attention", "class_attention")


def class_attention_refusal(name: str) -> str:
    """Why a CaiT store has CLS maps only (one line, for the config and the API)."""
    return (
        f"model {name!r} (CaiT): its attention layers are class-attention blocks, where only "
        "the class token queries, and its other blocks mix heads after the softmax; "
        "attention.full, attention.rollout and attention.stats need every token's row: "
        "set them false (cls_attention is stored)"
    )


@dataclass(frozen=True)
class TokenLayout:
    """Where each token sits in the model's sequence and what it is for.

    Prefix tokens come first (`prefix_roles`, from `roles.PREFIX_ROLES`: the class token first,
    then a distillation token or registers), then the patches row-major. `patch_size` is the
    pixel stride between neighbouring tokens, input size / grid (for hybrid models the
    stem's stride, not `patch_embed.patch_size`). `pooling` (`roles.POOLINGS` values) says
    how the model turns tokens into its output; `pool_latents` and `pool_heads` describe an
    attention pool (0 without one). A flat record of ints, strs, bools and tuples: it
    round-trips through `dataclasses.asdict`, JSON and `from_dict`.
    """

    num_prefix_tokens: int
    patch_size: tuple[int, int]
    grid: tuple[int, int]
    input_size: tuple[int, int]
    depth: int
    num_heads: int
    num_classes: int
    # Defaults describe the plain CLS-pooled ViT that older callers built this record for.
    prefix_roles: tuple[str, ...] | None = None
    pooling: str = "class_token"
    pool_latents: int = 0
    pool_heads: int = 0
    # What a layer is (`LAYER_KINDS`): a transformer block where every token queries, or
    # CaiT's class-attention block, where only the class token queries [cls, patches];
    # `depth` counts the layers of that kind.
    layer_kind: str = "self_attention"

    def __post_init__(self) -> None:
        roles = self.prefix_roles
        if roles is None:
            roles = ("class",) + ("register",) * (self.num_prefix_tokens - 1)
        roles = tuple(roles)
        object.__setattr__(self, "prefix_roles", roles)
        for name in ("patch_size", "grid", "input_size"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if len(roles) != self.num_prefix_tokens:
            raise ModelError(
                f"{self.num_prefix_tokens} prefix tokens but {len(roles)} roles {list(roles)}"
            )
        unknown = sorted(set(roles) - set(PREFIX_ROLES))
        if unknown or "class" in roles[1:]:
            raise ModelError(f"prefix roles {list(roles)}: expected {PREFIX_ROLES}, class first")
        if self.layer_kind not in LAYER_KINDS:
            raise ModelError(f"layer kind {self.layer_kind!r}: expected one of {LAYER_KINDS}")
        if self.layer_kind == "class_attention" and not self.has_class_token:
            raise ModelError("class-attention layers need a class token")
        if self.pooling not in POOLINGS.values():
            raise ModelError(
                f"pooling {self.pooling!r}: expected one of {sorted(POOLINGS.values())}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenLayout:
        """The inverse of `to_dict` / `dataclasses.asdict` (lists from JSON become tuples)."""
        fields: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        return cls(**fields)

    @property
    def has_class_token(self) -> bool:
        assert self.prefix_roles is not None
        return self.prefix_roles[:1] == ("class",)

    @property
    def num_register_tokens(self) -> int:
        assert self.prefix_roles is not None
        return self.prefix_roles.count("register")

    @property
    def num_distillation_tokens(self) -> int:
        assert self.prefix_roles is not None
        return self.prefix_roles.count("distillation")

    @property
    def maps(self) -> tuple[str, ...]:
        """The map arrays this model's store holds, default first (`roles.map_arrays`)."""
        return map_arrays(self.has_class_token, self.pooling)

    def roles(self) -> dict[str, Any]:
        """The `token_roles` root attribute of a store: JSON types only."""
        return {
            "prefix_roles": list(self.prefix_roles or ()),
            "has_class_token": self.has_class_token,
            "num_distillation_tokens": self.num_distillation_tokens,
            "num_register_tokens": self.num_register_tokens,
            "pooling": self.pooling,
            "pool_latents": self.pool_latents,
            "maps": list(self.maps),
        }

    @property
    def class_queries_only(self) -> bool:
        """Whether only the class token queries in the layers (CaiT): no full matrices."""
        return self.layer_kind == "class_attention"

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    def resolve_layers(self, layers: str | int | list[int] | tuple[int, ...]) -> tuple[int, ...]:
        """Turn `all`, one index or a list (negatives allowed) into sorted unique block indices."""
        items = check_layer_selection(layers)
        if items is None:
            return tuple(range(self.depth))
        out = set()
        for i in items:
            if not -self.depth <= i < self.depth:
                raise ModelError(
                    f"attention.layers: block {i} is out of range; the model has {self.depth} blocks "
                    f"(valid: {-self.depth}..{self.depth - 1})"
                )
            out.add(i % self.depth)
        return tuple(sorted(out))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
