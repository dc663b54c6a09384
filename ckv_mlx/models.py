"""Load mlx-lm models (folder, hub id, or the built-in SmolLM2) and describe their shape."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """What a profile must match: the attention geometry of a model."""

    name: str
    architecture: str
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int

    def dims(self) -> str:
        return (
            f"{self.layers} layers x {self.query_heads} query heads / "
            f"{self.kv_heads} KV heads, head_dim {self.head_dim}"
        )

    def same_geometry(self, other: "ModelShape") -> bool:
        return (self.layers, self.query_heads, self.kv_heads, self.head_dim) == (
            other.layers, other.query_heads, other.kv_heads, other.head_dim
        )
