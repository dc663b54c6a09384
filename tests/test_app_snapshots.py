"""SVG snapshots of ckv-chat's main screens over the fake engine
(update after a deliberate UI change: pytest tests/test_app_snapshots.py --snapshot-update)."""

from __future__ import annotations

from ckv_mlx.chat.events import ChatSettings
from test_app import SIZE, answered, make_app, ready, until


def test_document_open(snap_compare):
    async def opened(pilot):
        await until(pilot, lambda: ready(pilot.app))

    app, _ = make_app()
    assert snap_compare(app, terminal_size=SIZE, run_before=opened)


def test_answer_with_compressed_cache(snap_compare):
    app, _ = make_app(ChatSettings(policy="first-question", budget="64"))
    assert snap_compare(app, terminal_size=SIZE, run_before=answered)


def test_quit_dialog(snap_compare):
    async def quitting(pilot):
        await answered(pilot)
        await pilot.press("ctrl+q")
        await pilot.pause(0.2)

    app, _ = make_app()
    assert snap_compare(app, terminal_size=SIZE, run_before=quitting)
