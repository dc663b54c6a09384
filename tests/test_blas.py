"""OpenBLAS preload: re-exec once, never loop, warn once when it is missing."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import pytest

from ckv_mlx.model import blas

LIBRARY = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


@pytest.fixture
def linux(monkeypatch):
    """Pretend to be on Linux with no preload, and record instead of re-executing."""
    calls = []
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(blas.REEXEC_FLAG, raising=False)
    monkeypatch.setattr(blas, "find_openblas", lambda: LIBRARY)
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
    return calls


def test_reexecs_with_openblas_preloaded(linux, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/opt/libother.so")
    stopped = []
    blas.ensure_fast_blas(before_exec=lambda: stopped.append(True))
    [(executable, argv, env)] = linux
    assert executable == sys.executable and argv == sys.orig_argv
    assert env["LD_PRELOAD"] == f"{LIBRARY}:/opt/libother.so"
    assert env[blas.REEXEC_FLAG] == "1"
    assert stopped == [True]


def test_no_reexec_when_already_preloaded(linux, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/somewhere/libopenblasp-r0.3.so")
    blas.ensure_fast_blas()
    assert linux == []


def test_no_second_reexec(linux, monkeypatch):
    monkeypatch.setenv(blas.REEXEC_FLAG, "1")
    blas.ensure_fast_blas()
    assert linux == []


def test_no_reexec_without_openblas(linux, monkeypatch):
    monkeypatch.setattr(blas, "find_openblas", lambda: None)
    blas.ensure_fast_blas()
    assert linux == []


def test_no_reexec_on_macos(linux, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    blas.ensure_fast_blas()
    assert linux == []


def test_openblas_loaded_reads_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libblas.so.3\n")
    assert not blas.openblas_loaded(maps)
    maps.write_text(f"7f00-7f01 r-xp 0 08:01 1 {LIBRARY}\n")
    assert blas.openblas_loaded(maps)
    assert not blas.openblas_loaded(tmp_path / "missing")


def test_warns_once_about_reference_blas(monkeypatch, capsys):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(blas, "_warned", False)
    monkeypatch.setattr(blas, "openblas_loaded", lambda: False)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    blas.warn_if_slow_blas()
    blas.warn_if_slow_blas()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert "reference BLAS" in lines[0] and "libopenblas0-pthread" in lines[0]


def test_no_warning_with_openblas(monkeypatch, capsys):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(blas, "_warned", False)
    monkeypatch.setattr(blas, "openblas_loaded", lambda: True)
    blas.warn_if_slow_blas()
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not sys.platform.startswith("linux") or blas.find_openblas() is None,
                    reason="needs Linux with libopenblas.so.0 installed")
def test_real_reexec_maps_openblas():
    script = ("import sys; from ckv_mlx.model import blas; blas.ensure_fast_blas(); "
              "print(blas.openblas_loaded(), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", blas.REEXEC_FLAG)}
    result = subprocess.run([sys.executable, "-c", script, "an", "arg"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "True ['an', 'arg']", result.stderr
