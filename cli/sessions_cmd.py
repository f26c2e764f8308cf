"""`combllama sessions`: list, show, rename, remove, export and search chat sessions.

Tables on a terminal, tab-separated values (with a header row) when stdout is not one, one JSON
document with --json. Session text (questions, answers, names) goes through render.safe before a
terminal.
"""
from __future__ import annotations

import json
import sys

import click

from .options import json_option

JSON_SCHEMA = """\b
JSON (--json; keys may be added, never renamed or removed):
  list   → [Session, ...]
  show   → {"session": Session, "turns": [Turn, ...]}
  search → [{"session_id", "session", "snippet", "turn": Turn}, ...]
  Session = {"id", "name", "auto_named", "created_at", "updated_at", "model",
             "model_fingerprint", "system", "settings": {...},
             "memories": [{"name", "key"}], "turn_count"}
  Turn    = {"id", "session_id", "seq", "question", "answer", "interrupted", "created_at",
             "sources": [{"doc", "path", "label", "chunk", "share", "lines"|"pages"+"page_label"}],
             "usage": {"question_tokens", "memory_tokens", "history_tokens", "output_tokens", ...},
             "timings": {"load_ms", "prefill_ms", "decode_ms", "decode_tok_s"}}
  Times are UTC ISO 8601; ids are ULIDs."""


def _store():
    from .chat_cmd import sessions_store

    return sessions_store()


def _emit(obj) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def _tsv(value) -> str:
    return " ".join(str(value).split()) if value is not None else ""


def _table(header: list[str], rows: list[list]) -> None:
    from .render import safe

    if not sys.stdout.isatty():
        for row in [header, *rows]:
            sys.stdout.write("\t".join(_tsv(v) for v in row) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for h in header:
        table.add_column(h, overflow="fold")
    for row in rows:
        table.add_row(*[safe(_tsv(v)) for v in row])
    Console(highlight=False).print(table)


@click.group(epilog=JSON_SCHEMA)
def sessions():
    """Chat sessions: what was asked, over which memories, with which answers.

    \b
      combllama sessions list
      combllama sessions show book --json
      combllama sessions search lighthouse keeper
      combllama sessions export book --format md > book-chat.md
    """


@sessions.command("list")
@click.option("-n", "--limit", type=click.IntRange(1), default=None, help="Only the N most recent sessions.")
@json_option
def list_(limit, as_json):
    """Sessions, most recently used first: NAME ID DOCS TURNS MODEL UPDATED."""
    rows = _store().list(limit)
    if as_json:
        _emit([s.to_dict() for s in rows])
        return
    _table(["NAME", "ID", "DOCS", "TURNS", "MODEL", "UPDATED"],
           [[s.name, s.id, ",".join(s.memory_names) or "-", s.turn_count, s.model or "-", s.updated_at[:19]]
            for s in rows])


@sessions.command()
@click.argument("name")
@json_option
def show(name, as_json):
    """The session NAME (or id) with all its turns."""
    from .render import safe

    store = _store()
    session = store.get(name)
    turns = store.turns(session)
    if as_json:
        _emit({"session": session.to_dict(), "turns": [t.to_dict() for t in turns]})
        return
    text = store.export(session, "md")
    sys.stdout.write(safe(text) if sys.stdout.isatty() else text)


@sessions.command()
@click.argument("name")
@click.argument("new_name")
def rename(name, new_name):
    """Rename the session NAME to NEW_NAME."""
    from .render import note

    s = _store().rename(name, new_name)
    note(f"renamed to {s.name!r}")


@sessions.command()
@click.argument("names", nargs=-1, required=True)
def rm(names):
    """Delete sessions with their turns and the memory of their folded turns (the memories they
    reference are kept)."""
    import shutil

    from ..core.paths import Paths
    from .render import note

    store = _store()
    for name in names:
        s = store.get(name)
        store.delete(s)
        shutil.rmtree(Paths.from_env().history(s.id), ignore_errors=True)
        note(f"removed session {s.name!r} ({s.turn_count} turns)")


@sessions.command()
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["md", "json"]), default="md", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write to this file instead of stdout.")
def export(name, fmt, output):
    """The whole session as Markdown or JSON ({"format", "version", "session", "turns"})."""
    text = _store().export(name, fmt)
    if output:
        with click.open_file(output, "w", encoding="utf-8", atomic=True) as f:
            f.write(text)
    else:
        sys.stdout.write(text)


@sessions.command()
@click.argument("text", nargs=-1, required=True)
@click.option("--session", "session_name", default=None, metavar="NAME", help="Search only this session.")
@click.option("-n", "--limit", type=click.IntRange(1), default=20, show_default=True)
@json_option
def search(text, session_name, limit, as_json):
    """Turns whose question or answer contain every word of TEXT (full-text search)."""
    hits = _store().search(" ".join(text), limit, session=session_name)
    if as_json:
        _emit([h.to_dict() for h in hits])
        return
    _table(["SESSION", "TURN", "CREATED", "SNIPPET"],
           [[h.session_name, h.turn.seq, h.turn.created_at[:19], h.snippet] for h in hits])
