"""ckv-chat: the Textual terminal app for chatting with long documents (in progress)."""
