"""Make docs/ckv-chat.svg: ckv-chat on the built-in model, the sample PDF, one question
(policy first-question, so the panel shows the compressed cache after the answer).

Usage: .venv/bin/python scripts/screenshot.py [--out docs/ckv-chat.svg]
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from ckv_mlx.model.blas import ensure_fast_blas

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Who is the chief financial officer?"


async def shoot(out: Path):
    from ckv_chat.app import ChatApp
    from ckv_mlx.chat.engine import ChatEngine
    from ckv_mlx.chat.events import ChatSettings

    settings = ChatSettings(policy="first-question", max_tokens=48)
    app = ChatApp(lambda emit: ChatEngine(settings, emit), settings, doc=ROOT / "samples" / "report.pdf")
    async with app.run_test(size=(150, 42)) as pilot:
        await wait(pilot, lambda: app.query_one("#prompt") and not app.query_one("#prefill").display
                   and any("Ask away" in str(n.render()) for n in app.query("Note")))
        app.query_one("#prompt").value = QUESTION
        await pilot.press("enter")
        await wait(pilot, lambda: app.transcript[-1][0] == "answer")
        await pilot.pause(0.5)
        app.save_screenshot(filename=out.name, path=str(out.parent))
    print(f"wrote {out}")


async def wait(pilot, condition, timeout: float = 900):
    for _ in range(int(timeout / 0.1)):
        if condition():
            return
        await pilot.pause(0.1)
    raise SystemExit("timed out")


def main():
    ensure_fast_blas()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ckv-chat.svg")
    asyncio.run(shoot(parser.parse_args().out))


if __name__ == "__main__":
    main()
