"""`combllama chat`: an interactive, resumable chat over one or more memories (the REPL is in repl.py)."""
from __future__ import annotations

import click

from .options import load, model_options


def open_session(store, name: str | None, resume_latest: bool):
    """The session to chat in: the latest (-c), the named one (created if new), or a new unnamed one."""
    from ..core.errors import BadInputError
    from ..sessions.errors import SessionExistsError, SessionNotFoundError

    if resume_latest:
        latest = store.latest()
        if latest is None:
            raise BadInputError("no session to continue yet; start one with `combllama chat --session NAME`")
        return latest
    if name is None:
        return store.create()
    try:
        return store.get(name)
    except SessionNotFoundError:
        try:
            return store.create(name)
        except SessionExistsError:  # created by another process meanwhile
            return store.get(name)


def sessions_store():
    from ..core.paths import Paths
    from ..sessions.store import SessionStore

    return SessionStore(Paths.from_env().data / "sessions.db")


@click.command()
@click.option("--session", "session_name", metavar="NAME", default=None,
              help="Chat in the session NAME: created if new, resumed if it exists.")
@click.option("-c", "--continue", "resume_latest", is_flag=True, help="Resume the most recently used session.")
@click.option("-d", "--doc", "docs", multiple=True, metavar="MEMORY_OR_PATH",
              help="Attach a memory (a path is ingested first, or reused). Repeatable; kept in the session.")
@click.option("--method", default=None, metavar="NAME",
              help="Method for paths ingested on the fly and for folding long history into the session memory "
                   "(kept in the session; default: the first memory's, else the model's default).")
@click.option("-s", "--system", default=None, metavar="TEXT",
              help="Extra instructions for the model, kept in the session ('' removes them).")
@click.option("--render", type=click.Choice(["markdown", "plain", "raw"]), default=None,
              help="Answer output: markdown (default on a terminal), plain (text, control characters "
                   "neutralised) or raw (exact text; the default when stdout is not a terminal).")
@click.option("--stats", is_flag=True, help="Print token counts and speeds on stderr after each answer.")
@click.option("--no-cite", is_flag=True, help="Do not compute or print the sources of each answer.")
@click.option("--max-tokens", type=click.IntRange(1), default=None,
              help="Answer length cap (saved in the session; default 512).")
@click.option("--temperature", type=click.FloatRange(0), default=None,
              help="0 is greedy (saved in the session; default 0).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Nucleus sampling (saved in the session; default 1).")
@click.option("--seed", type=int, default=None, help="Seed for sampling (saved in the session).")
@model_options
def chat(session_name, resume_latest, docs, method, system, render, stats, no_cite, max_tokens, temperature, top_p, seed,
         spec):
    """Chat about documents in a named, resumable session; type /help inside for commands.

    A session references memories (never changes them) and keeps every turn in a SQLite database.
    Answers go to stdout, sources and notices to stderr. Piped stdin works too: one message per
    line, \"\"\" to start and end a multi-line one.

    \b
      combllama chat --session book -d book.md      # new session over a file (ingested once)
      combllama chat -c                              # resume the latest session
      echo "Who is the keeper?" | combllama chat --session book
    """
    from .ask_cmd import resolve_memory
    from .mdstream import choose_render
    from .render import note, warn
    from .repl import ChatApp, history_path, make_input

    if resume_latest and session_name:
        raise click.UsageError("use either --session NAME or -c/--continue")
    store = sessions_store()
    session = open_session(store, session_name, resume_latest)
    loaded = load(spec)
    if session.model_fingerprint and session.model_fingerprint != loaded.fingerprint:
        warn(f"session {session.name!r} was used with another model ({session.model}); its memories need that model")
    session = store.update_settings(session, model=spec.path or loaded.name, model_fingerprint=loaded.fingerprint)
    if method is not None:
        from ..core.methods import get_method

        get_method(method)  # an unknown name fails here, not at the first fold
        session = store.update_settings(session, {"method": method})
    for doc in docs:
        reader, _ = resolve_memory(loaded, doc, session.settings.get("method"), None, quiet=False)
        reader.check_model(loaded.fingerprint)
        session = store.add_memory(session, reader.name, reader.manifest.get("content_key"))
    if system is not None:
        session = store.update_settings(session, system=system or None)
    given = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    if any(v is not None for v in given.values()):
        session = store.update_settings(session, {k: v for k, v in given.items() if v is not None})
    cite = not no_cite and session.settings.get("cite", True)
    app = ChatApp(loaded, store, session, render=choose_render(render), show_stats=stats, cite=cite)
    app.attach()
    app.run(make_input(history_path()))
    app.refresh()
    note(f"session {app.session.name!r}: {app.session.turn_count} turns · resume with "
         f"`combllama chat --session {app.session.name}`")
