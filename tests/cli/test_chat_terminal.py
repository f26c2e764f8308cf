"""`combllama chat` in a real terminal (pexpect, a pty): type a question, stop its answer with Ctrl-C,
paste three lines as one message (bracketed paste), Ctrl-C on an empty prompt, /exit; then resume
the session in a second run and find the earlier turns."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pexpect
from click.testing import CliRunner

from combllama.cli.main import cli

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "lighthouse.md"
COMBLLAMA = str(Path(sys.executable).with_name("combllama"))
PROMPT = r">(\x08\x1b\[2C| )"  # prompt_toolkit draws "> " as ">" plus a cursor move


def spawn(*args):
    env = {**os.environ, "TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1", "COLUMNS": "100", "LINES": "40"}
    # A test run started in the background by a non-interactive shell inherits SIGINT ignored, and an ignored
    # signal stays ignored across exec: give the child the default disposition a terminal user has.
    child = pexpect.spawn(COMBLLAMA, list(args), env=env, encoding="utf-8", timeout=120, dimensions=(40, 100),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return child


def test_chat_in_a_terminal(tiny_dir, isolated_home):
    from combllama.sessions.store import SessionStore

    r = CliRunner().invoke(cli, ["ingest", str(SAMPLE), "--model", str(tiny_dir), "--name", "lh", "-q"])
    assert r.exit_code == 0
    child = spawn("chat", "--session", "s1", "-d", "lh", "--model", str(tiny_dir), "--max-tokens", "30000")
    child.expect("/help for commands")
    child.expect(PROMPT)
    child.sendline("Who keeps the lighthouse?")
    time.sleep(4)  # the random model is still generating (30,000 tokens would take minutes)
    child.sendintr()
    child.expect(r"\[interrupted\]")
    child.expect(PROMPT)
    child.sendline("/set max_tokens 3")
    child.expect("max_tokens = 3")
    child.expect(PROMPT)
    child.send("\x1b[200~first pasted line\nsecond pasted line\nthird pasted line\x1b[201~")
    child.send("\r")
    child.expect("Sources: ")
    child.expect(PROMPT)
    child.sendintr()  # on an empty prompt: a hint, not an exit
    child.expect("Ctrl-D or /exit to quit")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before

    turns = SessionStore(isolated_home / "data" / "sessions.db").turns("s1")
    assert [t.question for t in turns] == ["Who keeps the lighthouse?",
                                          "first pasted line\nsecond pasted line\nthird pasted line"]
    assert turns[0].interrupted and turns[0].answer and turns[0].usage["output_tokens"] > 3
    assert not turns[1].interrupted
    history = (isolated_home / "state" / "chat_history").read_text()  # input history across runs
    assert "Who keeps the lighthouse?" in history and "/set max_tokens 3" in history

    # A second run resumes the session and shows its earlier turns.
    child = spawn("chat", "--session", "s1", "--model", str(tiny_dir))
    child.expect(r"\(2 earlier turns\)")
    child.expect(PROMPT)
    child.sendline("/sessions")
    child.expect(r"\* s1  2 turns  lh")
    child.expect(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    r = CliRunner().invoke(cli, ["sessions", "show", "s1"])
    assert "Who keeps the lighthouse?" in r.stdout and "*[interrupted]*" in r.stdout and "third pasted line" in r.stdout
