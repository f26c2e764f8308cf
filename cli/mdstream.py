"""Streaming an answer to stdout: Markdown on a terminal, plain text otherwise.

Markdown uses aider's technique (aider/mdstream.py): the whole answer is re-rendered as it grows,
but rich `Live` shows only its last few lines; lines above them are printed once, for good, above
the live area. A reply taller than the screen therefore never duplicates lines in the scrollback
(the failure of `Live(Markdown(...), vertical_overflow="visible")`, Textualize/rich#3263). Refresh
is throttled to at most 20 per second and slows down when rendering gets slow.

Every piece of model text goes through `render.safe` before it can reach a terminal. Besides
render.py, the one module that imports rich (for the answer, which lives on stdout). Links are
shown as `text (target)`, never as OSC 8 hyperlinks whose target hides behind the text, and an image is
its alt text: a terminal app fetches nothing a document or the model names.
"""
from __future__ import annotations

import io
import sys
import time

from .render import safe

RENDERS = ("markdown", "plain", "raw")


def choose_render(requested: str | None, stream=None) -> str:
    """`--render`: markdown on a terminal by default, raw (the exact text) when stdout is not one."""
    tty = (stream or sys.stdout).isatty()
    if requested is None:
        return "markdown" if tty else "raw"
    return requested


class PlainStream:
    """Text as it comes. `raw` writes the model's exact text, but only when stdout is not a terminal."""

    def __init__(self, raw: bool = False, out=None):
        self.out = out or sys.stdout
        self.raw = raw and not self.out.isatty()
        self.text = ""

    def update(self, text: str, final: bool = False) -> None:
        delta, self.text = text[len(self.text):], text
        if delta:
            self.out.write(delta if self.raw else safe(delta))
            self.out.flush()
        if final:
            self.out.write("\n")
            self.out.flush()


class MarkdownStream:
    """rich Markdown, stable lines printed above a small Live window (see the module docstring)."""

    live_window = 6
    max_fps = 20

    def __init__(self, out=None):
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        self.out = out or sys.stdout
        self.console = Console(file=self.out, highlight=False)
        self.live = Live(Text(""), console=self.console, refresh_per_second=self.max_fps, transient=False)
        self.live.start()
        self.printed = 0  # rendered lines already printed above the live area, for good
        self.min_delay, self.when = 1.0 / self.max_fps, 0.0

    def _lines(self, text: str) -> list[str]:
        from rich.console import Console
        from rich.markdown import Markdown

        buf = io.StringIO()
        Console(file=buf, force_terminal=True, width=self.console.width, color_system=self.console.color_system,
                highlight=False).print(Markdown(safe(text), hyperlinks=False))
        return buf.getvalue().splitlines(keepends=True)

    def update(self, text: str, final: bool = False) -> None:
        from rich.text import Text

        now = time.monotonic()
        if not final and now - self.when < self.min_delay:
            return
        self.when = now
        t0 = time.monotonic()
        lines = self._lines(text)
        # Rendering grows with the answer: keep it under ~10% of the time, between 20 fps and 0.5 fps.
        self.min_delay = min(max((time.monotonic() - t0) * 10, 1.0 / self.max_fps), 2.0)
        stable = len(lines) if final else max(0, len(lines) - self.live_window)
        if stable > self.printed:
            self.live.console.print(Text.from_ansi("".join(lines[self.printed:stable])), end="")
            self.printed = stable
        if final:
            self.live.update(Text(""))
            self.live.stop()
            return
        self.live.update(Text.from_ansi("".join(lines[stable:])))


def open_stream(render: str, out=None):
    """The answer writer for a `--render` mode (already resolved with choose_render)."""
    if render == "markdown" and (out or sys.stdout).isatty():
        return MarkdownStream(out)
    return PlainStream(raw=render == "raw", out=out)
