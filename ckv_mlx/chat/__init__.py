"""The chat engine behind ckv-chat: ``events`` (plain data the UI reads) and ``engine``
(the MLX side, on its own thread). The UI imports ``events`` only."""
