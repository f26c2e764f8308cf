"""Everything the user sees besides the answer text: rich on stderr, plain when not a terminal.

The only module that imports rich. Text that came from documents or the model is passed through
`safe()` before it reaches a terminal (no escape sequences from untrusted input).
"""
from __future__ import annotations

import re
import sys

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Bidirectional overrides and isolates (Trojan Source, CVE-2021-42574) and the invisible direction marks:
# shown as <U+XXXX> so that what is displayed is the order the text really has.
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def safe(text: str) -> str:
    """Neutralise C0/C1 controls (ESC, OSC, CSI...) except tab and newline, and make bidi controls visible."""
    text = _CONTROL.sub(lambda m: "\ufffd" if m.group() != "\x1b" else "^[", text)
    return _BIDI.sub(lambda m: f"<U+{ord(m.group()):04X}>", text)


def console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def error(message: str) -> None:
    if sys.stderr.isatty():
        console().print(f"[bold red]error:[/] {safe(message)}", markup=True)
    else:
        sys.stderr.write(f"combllama: error: {safe(message)}\n")


def note(message: str) -> None:
    if sys.stderr.isatty():
        console().print(safe(message), style="dim", markup=False)
    else:
        sys.stderr.write(safe(message) + "\n")


def warn(message: str) -> None:
    if sys.stderr.isatty():
        console().print(f"[yellow]warning:[/] {safe(message)}", markup=True)
    else:
        sys.stderr.write(f"combllama: warning: {safe(message)}\n")


class IngestProgress:
    """A rich progress bar (chunks, tokens/s, ETA) on a terminal; silent otherwise."""

    def __init__(self, label: str, enabled: bool = True):
        self.enabled = enabled and sys.stderr.isatty()
        self.label, self._bar, self._task = label, None, None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("chunks · {task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console(), transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(safe(self.label), total=None, rate="")
        return self

    def update(self, p) -> None:
        if self._bar is not None:
            rate = f"{p.tokens_this_run / p.seconds:,.0f} tok/s" if p.seconds else ""
            self._bar.update(self._task, completed=p.chunks_done, total=p.chunks_total, rate=rate)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
