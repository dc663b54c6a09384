"""ckv-chat driven by Pilot over a fake engine: every feature of the app, each bad document."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from ckv_chat.app import POLICY_LABELS, ChatApp, QuitScreen
from ckv_chat.widgets import Answer, CachePanel, Note, UserMessage, bar_chart
from ckv_mlx.chat.events import ChatSettings
from ckv_mlx.errors import CKVError
from ckv_mlx.model.gguf import builtin_model_folder
from fake_engine import FakeEngine
from test_documents import SOURCE_TEXT, new_pdf, write_pdf

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
SIZE = (120, 40)


def make_app(settings=None, doc=SAMPLES / "report.pdf", session=None, **engine_kwargs):
    """The app over a fake engine, and the list that will hold that engine."""
    settings = settings or ChatSettings(method="compresskv", budget="64")
    engines = []

    def make_engine(emit):
        engines.append(FakeEngine(settings, emit, **engine_kwargs))
        return engines[-1]

    return ChatApp(make_engine, settings, doc=doc, session=session), engines


async def until(pilot, condition, timeout: float = 10.0):
    """Let the app process events until ``condition()`` holds."""
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError("timed out waiting for the app")


def notes(app) -> list[str]:
    return [str(n.render()) for n in app.query(Note)]


def ready(app) -> bool:
    return any(text.startswith("read ") for text in notes(app))


async def ask(pilot, text: str):
    """Put ``text`` in the prompt and press Enter (one test types it key by key)."""
    await pilot.click("#prompt")
    pilot.app.query_one("#prompt").value = text
    await pilot.press("enter")


async def answered(pilot, question: str = "Who is the CFO?"):
    """Wait for the document, ask ``question`` and wait for its answer."""
    await until(pilot, lambda: ready(pilot.app))
    await ask(pilot, question)
    await until(pilot, lambda: pilot.app.transcript[-1][0] == "answer")


def test_bar_chart_scales_to_the_largest_value():
    assert bar_chart([8, 4, 0], rows=1) == "█▄ "
    assert bar_chart([16, 8], rows=2).splitlines() == ["█ ", "██"]


async def test_question_streams_an_answer_and_the_panel_follows():
    app, engines = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: ready(app))
        panel = app.query_one(CachePanel)
        before = panel.view
        await pilot.click("#prompt")
        await pilot.press(*"Who is the CFO?", "enter")
        await until(pilot, lambda: app.transcript[-1][0] == "answer")
        assert [str(m.render()) for m in app.query(UserMessage)] == ["Who is the CFO?"]
        assert app.query(Answer).last().source == "The CFO is **Daniel Okafor**."
        assert ("ask", "Who is the CFO?") in engines[0].calls
        assert panel.view.position > before.position and len(panel.history) > 2
        assert "fake-model" in str(panel.query_one("#numbers").render())


async def test_panel_after_a_per_question_answer_shows_the_copy_it_used():
    app, engines = make_app(ChatSettings(policy="per-question", budget="64"))
    async with app.run_test(size=SIZE) as pilot:
        await answered(pilot)
        numbers = str(app.query_one("#numbers").render())
    tokens = engines[0].tokens
    assert f"ratio     {100 * 64 / tokens:.1f} %" in numbers and "not compressed" not in numbers
    assert f"held      {tokens * 6 * 1024 / 2**20:,.2f} MiB  (full cache kept)" in numbers
    assert "decode    10.0 tok/s" in numbers


async def test_first_question_can_be_typed_while_the_document_is_read(monkeypatch):
    gate = threading.Event()
    app, engines = make_app()
    original = FakeEngine._open

    def slow_open(self, path):
        gate.wait(10)
        original(self, path)

    monkeypatch.setattr(FakeEngine, "_open", slow_open)
    async with app.run_test(size=SIZE) as pilot:
        await ask(pilot, "Who is the CFO?")
        assert [str(m.render()) for m in app.query(UserMessage)] == ["Who is the CFO?"]
        assert not app.query(Answer)
        gate.set()
        await until(pilot, lambda: app.transcript[-1][0] == "answer")
        assert ready(app)


async def test_escape_stops_the_answer_and_keeps_what_was_said():
    app, engines = make_app(answer=" ".join(["word"] * 200), token_delay=0.02)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: ready(app))
        await ask(pilot, "Talk")
        await until(pilot, lambda: app.answering and app.query(Answer).last().source)
        await pilot.press("escape")
        await until(pilot, lambda: not app.answering)
        assert ("stop",) in engines[0].calls
        said = app.transcript[-1][1]
        assert 0 < said.count("word") < 200
        assert any("stopped" in text for text in notes(app))
        await ask(pilot, "Again")  # the chat goes on
        await until(pilot, lambda: app.transcript[-1] == ("answer", " ".join(["word"] * 200)), timeout=20)


@pytest.mark.parametrize("policy", list(POLICY_LABELS))
async def test_policy_is_labelled(policy):
    app, _ = make_app(ChatSettings(policy=policy, budget="64"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: ready(app))
        assert str(app.query_one("#policy").render()) == POLICY_LABELS[policy]
        assert policy in str(app.query_one("#numbers").render())


async def test_commands(tmp_path):
    other = tmp_path / "notes.md"
    other.write_text("# Notes\n\nThe board met twice.")
    app, engines = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: ready(app))
        for command in ["/budget 32", f"/doc {other}", "/method snapkv", "/reread", "/truncate middle", "/budget",
                        "/truncate", "/frobnicate", "/help", "/truncate end 900", "/truncate end lots", "/context"]:
            await ask(pilot, command)
        await until(pilot, lambda: app.sub_title == "notes.md" and len(engines[0].calls) >= 5)
        await until(pilot, lambda: any("read notes.md" in n for n in notes(app)))
        calls = engines[0].calls
        assert ("set_budget", "32") in calls and ("open", other) in calls
        assert ("set_method", "snapkv") in calls and ("reread",) in calls and ("truncate", "middle", None) in calls
        await until(pilot, lambda: ("context",) in engines[0].calls)
        assert ("truncate", "end", 900) in calls and not any(c[:2] == ("truncate", "end") and c[2] != 900 for c in calls)
        text = "\n".join(notes(app))
        assert "/budget needs N" in text and "unknown command /frobnicate" in text and "/export" in text
        assert "/truncate needs start, middle, end or none" in text and "/truncate start|middle|end" in text
        assert "N is a number of tokens, not 'lots'" in text
        assert app.query_one(CachePanel).view.budget == 32


def bad_documents(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each bad document and a word its message must contain."""
    locked = new_pdf()
    locked.multi_cell(0, 6, SOURCE_TEXT)
    locked.set_encryption(owner_password="owner", user_password="secret")
    scan = new_pdf()
    scan.image(Image.new("L", (64, 64), color=128), x=20, y=20, w=170)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    corrupt = tmp_path / "corrupt.pdf"
    corrupt.write_bytes(b"%PDF-1.4\n\x00garbage\n" * 20)
    return {
        "missing": (tmp_path / "missing.pdf", "not found"),
        "encrypted": (write_pdf(locked, tmp_path / "locked.pdf"), "encrypted"),
        "scanned": (write_pdf(scan, tmp_path / "scan.pdf"), "OCR"),
        "empty": (empty, "no text"),
        "corrupt": (corrupt, "not a valid PDF"),
    }


@pytest.mark.parametrize("kind", ["missing", "encrypted", "scanned", "empty", "corrupt"])
async def test_bad_document_gets_a_message_not_a_crash(tmp_path, kind):
    path, word = bad_documents(tmp_path)[kind]
    app, _ = make_app(doc=path)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: any(n.has_class("error") for n in app.query(Note)))
        error = next(n for n in app.query(Note) if n.has_class("error"))
        assert word in str(error.render()) and "\n" not in str(error.render())
        assert not app.query_one("#prefill").display
        await ask(pilot, f"/doc {SAMPLES / 'report.txt'}")  # the app goes on
        await until(pilot, lambda: ready(app))


async def test_save_then_resume_restores_the_conversation(tmp_path):
    session = tmp_path / "report.ckv"
    app, _ = make_app(session=session)
    async with app.run_test(size=SIZE) as pilot:
        await answered(pilot)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not app.unsaved)
    assert json.loads(session.read_text())["turns"][0][0] == "Who is the CFO?"
    settings = ChatSettings()
    resumed = ChatApp(lambda emit: FakeEngine(settings, emit), settings, resume=session)
    async with resumed.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: resumed.query(Answer) and resumed.query(Answer).last().source)  # rendered
        assert [str(m.render()) for m in resumed.query(UserMessage)] == ["Who is the CFO?"]
        assert resumed.query(Answer).last().source == "The CFO is **Daniel Okafor**."
        assert resumed.sub_title == "report.pdf"


async def test_unwritable_session_path_is_reported(tmp_path):
    app, _ = make_app(session=tmp_path / "no" / "such" / "s.ckv")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: ready(app))
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("cannot write" in n for n in notes(app)))
        await ask(pilot, f"/export {tmp_path / 'no' / 'such.md'}")
        await until(pilot, lambda: sum("cannot write" in n for n in notes(app)) == 2)


async def test_quit_with_unsaved_changes_asks_and_can_save(tmp_path):
    session = tmp_path / "report.ckv"
    app, _ = make_app(session=session)
    async with app.run_test(size=SIZE) as pilot:
        await answered(pilot)
        await pilot.press("ctrl+q")
        await until(pilot, lambda: isinstance(app.screen, QuitScreen))
        await pilot.click("#save")
        await until(pilot, lambda: not app.is_running)
    assert session.exists()


async def test_export_copy_and_history(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await answered(pilot)
        await pilot.press("ctrl+y")
        assert app.clipboard == "The CFO is **Daniel Okafor**."
        await pilot.press("ctrl+o")
        await until(pilot, lambda: (tmp_path / "report-transcript.md").exists())
        await pilot.press("up")
        assert app.query_one("#prompt").value == "Who is the CFO?"
        await pilot.press("down")
        assert app.query_one("#prompt").value == ""
    exported = (tmp_path / "report-transcript.md").read_text()
    assert exported.splitlines()[0] == "# ckv-chat: report.pdf"
    assert "**You:** Who is the CFO?" in exported and "**Answer:** The CFO is **Daniel Okafor**." in exported


async def test_context_gauge_warns_near_the_limit():
    app, engines = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: ready(app))
        view = engines[0].view()
        panel = app.query_one(CachePanel)
        assert not app.query_one("#context-label").has_class("warning")
        panel.show(type(view)(**{**view.__dict__, "position": 7000}))
        assert app.query_one("#context-label").has_class("warning")
        assert "7,000 / 8,192" in str(app.query_one("#context-label").render())


NOISY = """
import logging, sys, warnings
import ckv_chat.app
from mlx_lm.utils import load_tokenizer

def noisy(app=None):  # what libraries do while the app runs
    load_tokenizer(sys.argv[2]).encode("word " * 9000)  # over SmolLM2's 8,192: transformers warns
    logging.getLogger("huggingface_hub").warning("hub: a warning")
    warnings.warn("a library warning")

if sys.argv[1] == "app":
    ckv_chat.app.ChatApp.run = noisy
    from ckv_chat.cli import main
    main([])
else:
    noisy()
"""


def test_library_warnings_reach_the_terminal_but_not_under_the_app(tmp_path):
    """transformers' too-long warning is printed by a handler bound to the terminal at
    import; ckv-chat's setup (around ChatApp.run) sends it and the rest to its log."""
    try:
        folder = str(builtin_model_folder())
    except CKVError as e:
        pytest.skip(f"built-in model unavailable: {e}")
    env = {**os.environ, "CKV_CACHE_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", NOISY, mode, folder], capture_output=True, text=True,
                              env=env, timeout=120)

    plain, app = run("plain"), run("app")
    assert plain.returncode == 0 and "Token indices sequence length is longer" in plain.stderr
    assert "hub: a warning" in plain.stderr and "a library warning" in plain.stderr
    assert app.returncode == 0 and (app.stdout, app.stderr) == ("", "")
    log = (tmp_path / "ckv-chat.log").read_text()
    assert all(w in log for w in ("Token indices sequence length is longer", "hub: a warning", "a library warning"))


def test_cli_passes_repetition_penalty_and_truncate_and_refuses_a_bad_penalty(tmp_path, monkeypatch, capsys):
    from ckv_chat import cli

    seen = []
    monkeypatch.setenv("CKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ChatApp, "run", lambda app: seen.append(app.settings))
    assert cli.main(["--repetition-penalty", "1.15", "--truncate", "end"]) == 0 and cli.main([]) == 0
    assert [(s.repetition_penalty, s.truncate) for s in seen] == [(1.15, "end"), (None, "none")]
    assert cli.main(["--repetition-penalty", "0"]) == 2
    assert capsys.readouterr().err == "error: --repetition-penalty must be more than 0 (1 is no penalty; try 1.1)\n"


def test_cli_passes_the_precision_and_refuses_an_unknown_one(tmp_path, monkeypatch, capsys):
    from ckv_chat import cli

    seen = []
    monkeypatch.setenv("CKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ChatApp, "run", lambda app: seen.append(app.settings))
    assert cli.main(["--precision", "native"]) == 0 and cli.main(["--precision", "float32"]) == 0
    assert cli.main([]) == 0
    assert [s.precision for s in seen] == ["native", "float32", None]  # None: $CKV_PRECISION, else the device's
    with pytest.raises(SystemExit) as exit:
        cli.main(["--precision", "float16"])
    assert exit.value.code == 2 and "invalid choice: 'float16'" in capsys.readouterr().err
