"""The evaluation harness: `python -m ckv_mlx.eval`."""
