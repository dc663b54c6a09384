"""The KV cache itself, what mlx-lm sees: an evicting cache (and its quantized rows), the
self-compressing one mlx-lm's generation drives, the attention pass-through that shows a
layer's window queries, and the one place a layer is compressed (``eviction``)."""
