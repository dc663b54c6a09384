"""ckv-serve: an OpenAI-compatible server (protocol.py: the wire format; worker.py: the MLX thread; app.py: HTTP)."""
