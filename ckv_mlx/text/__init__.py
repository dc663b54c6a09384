"""Text in: documents read from files (``documents``) and turned into prompts (``prompts``)."""
