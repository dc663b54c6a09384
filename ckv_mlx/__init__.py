"""CompressKV KV-cache compression for MLX."""

__version__ = "0.1.0"

# The method every tool uses unless told: the CompressKV variant that measured best on the
# built-in model, one token set per KV head, each kept token keeping the 8 after it (whole
# numbers and codes; docs/results.md, "Exact facts from real documents").
DEFAULT_METHOD = "compresskv-gqa+span8"

# mlx-lm's load_prompt_cache finds a cache class by its name in mlx_lm.models.cache: importing
# the cache module puts EvictingKVCache there, so mlx-lm's own files carry compressed caches.
from . import cache as _cache  # noqa: E402,F401
