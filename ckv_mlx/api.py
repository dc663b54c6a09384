"""The Python API: CompressKV as a drop-in prompt cache for mlx-lm's own generation.

    model, tokenizer = ckv_mlx.load()
    cache = ckv_mlx.make_prompt_cache(model, budget=128)
    for r in mlx_lm.stream_generate(model, tokenizer, prompt, prompt_cache=cache): ...

Every default is ``python -m ckv_mlx.generate``'s, and a bad argument raises the
:class:`~ckv_mlx.errors.CKVError` whose message is the CLI's one line.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace

from mlx_lm.models.cache import make_prompt_cache as mlx_lm_prompt_cache

from . import CACHE_METHOD
from .kv.attention import observe
from .policy.budgets import check_budget
from .errors import CKVError
from .group.placement import placement
from .model.families import attention_modules
from .kv.layer_caches import fresh_others
from .policy.methods import make_method
from .model.models import load_model, model_shape
from .profiles import Profile, check_profile_matches, load_profile, shipped_profile_for
from .kv.prompt_cache import CompressingKVCache, LayerPolicy
from .kv.quantized import for_heads, kv_bits_setting

MODEL_NAME = "ckv_model_name"  # the attribute :func:`load` names a model by (what finds its shipped profile)
UNNAMED = "the model"  # a model mlx-lm loaded: its shipped profile is found by geometry


def load(model: str | None = None, precision: str | None = None):
    """``(model, tokenizer)`` as ``mlx_lm.load`` gives them, for a built-in name (default:
    the built-in SmolLM2), a local mlx-lm folder or a Hugging Face id; ``precision`` as
    ``--precision`` (float32 or native)."""
    loaded = load_model(model, precision)
    setattr(loaded.model, MODEL_NAME, loaded.name)
    return loaded.model, loaded.tokenizer


def make_prompt_cache(model, method: str = CACHE_METHOD, budget: int = 128,
                      profile: str | os.PathLike | Profile | None = None, kv_bits: int | None = None,
                      kv_group_size: int | None = None, region: int | None = None) -> list:
    """One cache per layer of ``model`` for mlx-lm's ``generate`` / ``stream_generate`` /
    ``generate_step`` (``prompt_cache=``): the layers that compress get a
    :class:`~ckv_mlx.kv.prompt_cache.CompressingKVCache`, the others mlx-lm's own cache.

    ``budget`` is tokens per layer on average; ``profile`` a profile (file or loaded; default:
    the model's shipped one); ``kv_bits`` packs the kept rows (default 8 for a compressing
    method, 16: as computed); ``region`` the rows for new tokens before a re-score.
    """
    attentions = attention_modules(model)
    if placement(model).split:
        raise CKVError("this model is split over several processes (mlx-lm's sharded_load): make_prompt_cache "
                       "compresses a model held whole; run python -m ckv_mlx.generate, ckv-chat or ckv-serve under "
                       "mlx.launch instead")
    observe(attentions)  # their modules' attention made visible; each cache brings its own window
    shape = model_shape(model, getattr(model, MODEL_NAME, None) or UNNAMED)
    chosen = profile if isinstance(profile, Profile) or profile is None else load_profile(profile)
    chosen = chosen or shipped_profile_for(shape)
    if chosen and shape.name == UNNAMED:  # known by its geometry only: no name to compare
        shape = replace(shape, name=chosen.name)
    for note in check_profile_matches(chosen, shape) if chosen else ():
        warnings.warn(note, stacklevel=2)
    scorer, notes = make_method(method, chosen)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    if not scorer.compresses:
        return mlx_lm_prompt_cache(model)
    if region is not None and region < 1:
        raise CKVError("region must be at least 1 (rows per layer for generated tokens)")
    if scorer.word:  # the cache sees rows, never tokens
        warnings.warn(f"method {method!r}: wordN needs the prompt's tokens, which an mlx-lm cache never sees, so "
                      "this cache selects without it (ckv_mlx.generate and the chat use it)", stacklevel=2)
    check_budget(budget, scorer.window)
    bits = for_heads(kv_bits_setting(kv_bits, kv_group_size), {shape.head_dim})
    profiled = chosen if hasattr(scorer, "profile") else None
    caches = iter([
        CompressingKVCache(LayerPolicy(
            scorer.name, layer, layer_budget, budget, shape.kv_heads, shape.head_dim, scorer.window, scorer.kernel,
            scorer.pooling, profiled.srh_heads(layer) if profiled else None, profiled.layer_errors if profiled else None,
            (bits.bits, bits.group_size) if bits else None, profiled.name if profiled else None), region)
        for layer, layer_budget in enumerate(scorer.layer_budgets(budget, len(attentions)))
    ])
    others = fresh_others(model)
    return [others[i] if i in others else next(caches) for i in range(len(attentions) + len(others))]


def compress(prompt_cache: list, budget: int | None = None) -> list:
    """Select now, in every compressing layer of ``prompt_cache``, with the window of the
    tokens read last (for callers that read the prompt themselves, as mlx-lm's
    ``cache_prompt``); ``budget`` (tokens per layer on average) replaces the cache's."""
    ours = [c for c in prompt_cache if isinstance(c, CompressingKVCache)]
    if not ours:
        raise CKVError("the prompt cache has no layer that compresses: make it with ckv_mlx.make_prompt_cache")
    if budget is None:
        for cache in ours:
            cache.select()
        return prompt_cache
    method = ours[0].method
    check_budget(budget, method.window)
    for cache, layer_budget in zip(ours, method.layer_budgets(budget, len(ours))):
        cache.select(budget, layer_budget)
    return prompt_cache
