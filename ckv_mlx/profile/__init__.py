"""The profiler: `python -m ckv_mlx.profile srh|layers|validate`."""
