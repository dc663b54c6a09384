"""The engine: a model read, compressed and decoded (``session``), a conversation over it
(``conversation``), the memory plan of a read (``memory``), and the one MLX thread the chat
and the server share (``runtime``)."""
