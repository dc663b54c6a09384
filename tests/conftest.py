import os

from ckv_mlx.blas import ensure_fast_blas

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    """Re-run the test process with OpenBLAS preloaded (Linux), output intact."""
    capture = config.pluginmanager.getplugin("capturemanager")
    ensure_fast_blas(before_exec=capture.stop_global_capturing if capture else None)
