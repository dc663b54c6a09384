"""Stand-ins for the profile of a tiny model."""

from __future__ import annotations

import random

from ckv_mlx.models import ModelShape
from ckv_mlx.profiles import Defaults, Profile, Provenance


def tiny_shape(model, name: str = "tiny") -> ModelShape:
    attn = model.layers[0].self_attn
    head_dim = attn.q_proj.weight.shape[0] // attn.n_heads
    return ModelShape(name, model.model_type, len(model.layers), attn.n_heads, attn.n_kv_heads, head_dim)


def fake_profile(model, seed: int = 0, name: str = "tiny") -> Profile:
    """A profile with random SRH rankings and layer errors for ``model``."""
    rng = random.Random(seed)
    shape = tiny_shape(model, name)
    heads = list(range(shape.query_heads))
    srh = [rng.sample(heads, len(heads)) for _ in range(shape.layers)]
    errors = [rng.random() + 0.1 for _ in range(shape.layers)]
    total = sum(errors)
    return Profile(
        shape=shape,
        srh=srh,
        provenance=Provenance(how="profiled", notes="random, for tests"),
        defaults=Defaults(first_k=2),
        layer_errors=[e / total for e in errors],
    )
