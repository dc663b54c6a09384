"""The disk tier: documents' full caches as stores (``store``: format, keys, pruning) and a
conversation's full cache read from them one layer at a time (``disk_cache``)."""
