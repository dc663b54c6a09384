"""CompressKV KV-cache compression for MLX."""

__version__ = "0.1.0"

# The method every tool uses unless told: the CompressKV variant that measured best on the
# built-in model, one token set per KV head, each kept token keeping the 8 after it and its
# whole word (numbers, codes, UUIDs; docs/results.md, "Exact facts from real documents").
DEFAULT_METHOD = "compresskv-gqa+span8+word48"
# An mlx-lm cache's (make_prompt_cache): the same less wordN, which needs the prompt's tokens,
# and a cache never sees them.
CACHE_METHOD = "compresskv-gqa+span8"

# The Python API. Importing it also registers our caches in mlx_lm.models.cache, where
# mlx-lm's load_prompt_cache finds a saved cache's class by name.
from .api import compress, load, make_prompt_cache  # noqa: E402
from .errors import CKVError  # noqa: E402

__all__ = ["CACHE_METHOD", "DEFAULT_METHOD", "CKVError", "compress", "load", "make_prompt_cache"]
