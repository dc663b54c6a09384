"""Stand-ins for the profile of a tiny model."""

from __future__ import annotations

import random

from ckv_mlx.model.models import ModelShape, model_shape
from ckv_mlx.profiles import Defaults, Profile, Provenance


def tiny_shape(model, name: str = "tiny") -> ModelShape:
    return model_shape(model, name)


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
