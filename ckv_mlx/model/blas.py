"""Make MLX's Linux CPU backend use OpenBLAS instead of its bundled reference BLAS.

The `mlx-cpu` wheel ships the slow netlib BLAS (~15x slower matmuls). The dynamic loader
only honours `LD_PRELOAD` at process start, so `ensure_fast_blas` re-executes the process
once with OpenBLAS preloaded. Nothing here does anything on macOS.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path
from typing import Callable

REEXEC_FLAG = "CKV_BLAS_REEXEC"
KNOWN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
FIX_HINT = (
    "install OpenBLAS (apt-get install libopenblas0-pthread) and run through `make`, "
    "or set LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
)

_warned = False


def find_openblas() -> str | None:
    """Path (or soname) of an installed libopenblas.so.0, or None."""
    for path in KNOWN_PATHS:
        if Path(path).exists():
            return path
    return ctypes.util.find_library("openblas")


def _preloaded(env: dict) -> bool:
    return "openblas" in env.get("LD_PRELOAD", "")


def ensure_fast_blas(before_exec: Callable[[], object] | None = None) -> None:
    """On Linux, re-exec this process once with OpenBLAS in LD_PRELOAD (if installed).

    `before_exec` runs just before the re-exec: pytest passes its capture manager's
    `stop_global_capturing`, or the new process would inherit the capture files as stdout.
    """
    if not sys.platform.startswith("linux"):
        return
    if os.environ.get(REEXEC_FLAG) or _preloaded(os.environ):
        return
    library = find_openblas()
    if library is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(filter(None, [library, env.get("LD_PRELOAD")]))
    env[REEXEC_FLAG] = "1"
    if before_exec is not None:
        before_exec()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def openblas_loaded(maps: Path = Path("/proc/self/maps")) -> bool:
    """Whether an OpenBLAS library is mapped into this process."""
    try:
        return "openblas" in maps.read_text()
    except OSError:
        return False


def warn_if_slow_blas() -> None:
    """Print one stderr warning per process if MLX runs on the CPU with reference BLAS."""
    global _warned
    if _warned or not sys.platform.startswith("linux"):
        return
    import mlx.core as mx

    if mx.default_device().type != mx.cpu or openblas_loaded():
        return
    _warned = True
    print(f"warning: MLX is using the slow reference BLAS on this CPU; {FIX_HINT}",
          file=sys.stderr)
