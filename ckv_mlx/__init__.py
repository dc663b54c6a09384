"""CompressKV KV-cache compression for MLX."""

__version__ = "0.1.0"
