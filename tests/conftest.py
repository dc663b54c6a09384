import os
import tempfile

import pytest

from ckv_mlx.model.blas import ensure_fast_blas

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Full caches on disk never go to the user's cache: a folder for the whole run (module
# fixtures), and one of each test's own (private_stores).
os.environ["CKV_STORE_DIR"] = tempfile.mkdtemp(prefix="ckv-test-stores-")


def pytest_configure(config):
    """Re-run the test process with OpenBLAS preloaded (Linux), output intact."""
    capture = config.pluginmanager.getplugin("capturemanager")
    ensure_fast_blas(before_exec=capture.stop_global_capturing if capture else None)


@pytest.fixture(autouse=True)
def private_stores(tmp_path_factory, monkeypatch):
    """Full caches on disk go to a folder of the test's own, never the user's cache."""
    monkeypatch.setenv("CKV_STORE_DIR", str(tmp_path_factory.mktemp("stores")))


@pytest.fixture(scope="session")
def default_model():
    """The built-in model (loaded once), or skip: its wheel comes with `make setup`."""
    from ckv_mlx.errors import CKVError
    from ckv_mlx.model.models import load_model

    try:
        return load_model()
    except CKVError as e:
        pytest.skip(f"built-in model unavailable: {e}")
