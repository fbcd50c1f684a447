"""Where each token sits in a ViT's sequence, kept free of torch.

The layout is read once from the built model (`vit_attn.model.token_layout`) and then travels
as plain data: the export cache keeps it as JSON beside the graph (`vit_attn.graphcache`), so a
run whose graph is cached never imports torch to learn it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import ModelError
from .specs import check_layer_selection


@dataclass(frozen=True)
class TokenLayout:
    """Where each token sits in the model's sequence: prefix tokens first, then patches row-major."""

    num_prefix_tokens: int
    patch_size: tuple[int, int]
    grid: tuple[int, int]
    input_size: tuple[int, int]
    depth: int
    num_heads: int
    num_classes: int

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
