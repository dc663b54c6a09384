"""Models: loading (``models``; the built-in ones from their GGUF wheels), the families that
compress (``families``), identities (``fingerprint``) and a fast BLAS on Linux (``blas``)."""
