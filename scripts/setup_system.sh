#!/usr/bin/env bash
# System packages the project needs. On Linux: OpenBLAS, which MLX's CPU backend is
# preloaded with (its bundled reference BLAS is ~15x slower). Nothing to do on macOS.
set -euo pipefail
[ "$(uname -s)" = Linux ] || exit 0
if ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0'; then
    exit 0
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
if command -v apt-get >/dev/null; then
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq libopenblas0-pthread
elif command -v dnf >/dev/null; then
    $sudo dnf install -y openblas
else
    echo "warning: install OpenBLAS (libopenblas.so.0) for fast CPU matmuls" >&2
fi
