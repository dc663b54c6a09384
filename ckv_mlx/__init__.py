"""CompressKV KV-cache compression for MLX."""

__version__ = "0.1.0"

# The method every tool uses unless told: the CompressKV variant that measured best on the
# built-in models (one token set per KV head; docs/results.md, "NIAH at 1,000 to 7,000 tokens").
DEFAULT_METHOD = "compresskv-gqa"

# mlx-lm's load_prompt_cache finds a cache class by its name in mlx_lm.models.cache: importing
# the cache module puts EvictingKVCache there, so mlx-lm's own files carry compressed caches.
from . import cache as _cache  # noqa: E402,F401
