"""ckv-chat on the built-in model and the sample PDF: through Pilot, and in a real
terminal (tmux send-keys / capture-pane)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckv_chat.app import ChatApp
from ckv_chat.widgets import CachePanel
from ckv_mlx.chat.engine import ChatEngine
from ckv_mlx.chat.events import ChatSettings
from test_app import SAMPLES, SIZE, ask, ready, until

pytestmark = pytest.mark.slow
PDF = SAMPLES / "report.pdf"


async def test_end_to_end_on_the_built_in_model(default_model, tmp_path):
    settings = ChatSettings(budget="128", max_tokens=12)
    app = ChatApp(lambda emit: ChatEngine(settings, emit, loader=lambda name: default_model), settings,
                  doc=PDF, session=tmp_path / "report.ckv")
    async with app.run_test(size=SIZE) as pilot:
        panel = app.query_one(CachePanel)
        # the "read" note can come a moment before the panel's view of the finished read
        await until(pilot, lambda: ready(app) and panel.view.phase != "prefilling", timeout=600)
        full = panel.view.full_bytes
        assert panel.view.kept_bytes == 0 < full and panel.view.document == "report.pdf"  # every row on disk
        assert panel.view.disk_bytes > 0.9 * full  # the rows; full is what memory would allocate, in 256-row steps
        await ask(pilot, "Who is the chief financial officer?")
        await until(pilot, lambda: app.transcript[-1][0] == "answer", timeout=300)
        assert app.transcript[-1][1].strip()
        view = panel.view  # per-question on disk: memory holds the selection, nothing beside it
        assert view.held_bytes == view.kept_bytes < 0.2 * full  # 128 of ~3,500 tokens per layer
        assert view.compressed and view.decode_tps > 0 and max(view.layer_tokens) < 0.2 * view.position
        assert view.reselect_s > 0
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not app.unsaved, timeout=60)
    assert (tmp_path / "report.ckv").stat().st_size < 0.2 * full  # it refers to the store, not its rows


def pane(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout


def wait_for(session: str, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        screen = pane(session)
        if text in screen:
            return screen
        time.sleep(0.5)
    raise AssertionError(f"{text!r} never appeared; the screen was:\n{pane(session)}")


def kept_line(screen: str) -> str:
    return next(line for line in screen.splitlines() if "kept " in line and "MiB" in line)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_in_a_real_terminal(tmp_path):
    session = f"ckv-test-{os.getpid()}"
    command = (f"cd {tmp_path} && HF_HUB_OFFLINE=1 {sys.executable} -m ckv_chat.cli "
               f"--doc {PDF} --max-tokens 400; echo $? > {tmp_path / 'exit-code'}")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "45", command], check=True)
    try:
        before = kept_line(wait_for(session, "Ask away", timeout=600))
        subprocess.run(["tmux", "send-keys", "-t", session, "Tell me about the company in detail.", "Enter"], check=True)
        during = wait_for(session, "(from disk)", timeout=120)  # answering from what was selected
        assert kept_line(during) != before
        subprocess.run(["tmux", "send-keys", "-t", session, "Escape"], check=True)
        wait_for(session, "(stopped", timeout=60)
        subprocess.run(["tmux", "send-keys", "-t", session, "C-q"], check=True)
        wait_for(session, "Save this session before quitting?", timeout=30)
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)  # quit without saving
        deadline = time.monotonic() + 30
        while subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, pane(session)
            time.sleep(0.5)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert (tmp_path / "exit-code").read_text().strip() == "0"  # no traceback, no abort at exit
    assert not list(Path(tmp_path).glob("*.ckv"))  # quit without saving
