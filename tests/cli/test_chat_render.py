"""The answer stream: Markdown on a terminal prints every line of a long answer exactly once above a
small live window (no duplicated scrollback); plain text is neutralised on a terminal, exact when piped;
and the REPL's message reader joins \"\"\" blocks."""
from __future__ import annotations

import io

from combllama.cli.mdstream import MarkdownStream, PlainStream, choose_render, open_stream
from combllama.cli.repl import read_message


class TTY(io.StringIO):
    def isatty(self):
        return True


class Pipe(io.StringIO):
    def isatty(self):
        return False


def test_markdown_stream_prints_each_line_once():
    out = TTY()
    stream = open_stream("markdown", out)
    assert isinstance(stream, MarkdownStream)
    printed = []
    original = stream.live.console.print

    def spy(obj, *args, **kwargs):
        if hasattr(obj, "plain"):  # our stable lines (Live itself prints controls and newlines)
            printed.append(obj.plain)
        original(obj, *args, **kwargs)

    stream.live.console.print = spy
    text = ""
    for i in range(80):  # taller than any screen
        text += f"Line number {i} of a long answer.\n\n"
        stream.when = 0.0  # no throttling in the test: every update renders
        stream.update(text)
        assert len("".join(printed).splitlines()) <= len(stream._lines(text))  # never ahead of the render
    stream.update(text, final=True)
    lines = [line.strip() for line in "".join(printed).splitlines() if line.strip()]
    assert lines == [f"Line number {i} of a long answer." for i in range(80)]


def test_markdown_neutralises_escape_sequences():
    stream = MarkdownStream(TTY())
    rendered = "".join(stream._lines("**bold** and \x1b]52;c;ZXZpbA==\x07 clipboard"))
    stream.update("", final=True)
    assert "\x1b]52" not in rendered and "^[]52" in rendered


def test_plain_and_raw_streams():
    tty, pipe = TTY(), Pipe()
    for out in (tty, pipe):
        s = PlainStream(raw=True, out=out)
        s.update("a\x1b[2J")
        s.update("a\x1b[2Jb", final=True)
    assert tty.getvalue() == "a^[[2Jb\n"  # a terminal never receives the model's escape sequences
    assert pipe.getvalue() == "a\x1b[2Jb\n"  # piped raw output is the exact text
    assert choose_render(None, TTY()) == "markdown" and choose_render(None, Pipe()) == "raw"
    assert choose_render("plain", Pipe()) == "plain"


class Lines:
    interactive = False

    def __init__(self, *lines):
        self.lines = list(lines)

    def read(self, continuation=False):
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)


def test_read_message_blocks():
    assert read_message(Lines("hello")) == "hello"
    assert read_message(Lines('"""', "one", "", "two", '"""', "next")) == "one\n\ntwo"
    assert read_message(Lines('"""first', 'last"""')) == "first\nlast"
    assert read_message(Lines('"""inline"""')) == "inline"
    assert read_message(Lines('"""', "unterminated")) == "unterminated"
