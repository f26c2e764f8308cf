"""`combllama ingest`: read a document, encode it chunk by chunk into a named memory."""
from __future__ import annotations

import contextlib
import json
import signal

import click

from .options import json_option, load, model_options


@contextlib.contextmanager
def graceful_interrupt():
    """First Ctrl-C asks the ingest loop to stop at the next chunk boundary (and commit); a second
    one interrupts at once — safe, because every write is atomic."""
    state = {"stop": False}

    def handler(signum, frame):
        if state["stop"]:
            raise KeyboardInterrupt
        state["stop"] = True

    try:
        old = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (tests): no handler, Ctrl-C behaves as usual
        old = None
    try:
        yield lambda: state["stop"]
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def source_options(f):
    """Options of reading a source, shared by `ingest` and `count`."""
    f = click.option("--password-stdin", is_flag=True,
                     help="Read an encrypted PDF's password from stdin (prompted, hidden, on a terminal).")(f)
    f = click.option("--exclude", multiple=True, metavar="PATTERN",
                     help="Leave out folder files matching this .gitignore-style pattern (repeatable).")(f)
    f = click.option("--include", multiple=True, metavar="PATTERN",
                     help="Read only folder files matching this .gitignore-style pattern (repeatable).")(f)
    return f


def read_password(enabled: bool) -> str | None:
    """The password for --password-stdin: one line of stdin, or a hidden prompt on a terminal."""
    import sys

    if not enabled:
        return None
    if sys.stdin.isatty():
        return click.prompt("PDF password", hide_input=True, err=True, default="", show_default=False)
    return sys.stdin.readline().rstrip("\r\n")


def load_document(path, options=None, include=(), exclude=()):
    """ingest.load(path), with --include/--exclude applied to a folder's file list before any file is read.

    A file left out by a pattern is reported like every other skip (reason "excluded")."""
    from pathlib import Path

    from .. import ingest as sources
    from .render import warn

    if not (include or exclude):
        return sources.load(path, options)
    if not Path(path).is_dir():
        warn(f"{path}: --include/--exclude apply to folders; reading the file as it is")
        return sources.load(path, options)
    import pathspec

    inc = pathspec.GitIgnoreSpec.from_lines(include) if include else None
    exc = pathspec.GitIgnoreSpec.from_lines(exclude) if exclude else None
    scan = sources.scan(path, options)
    kept = []
    for f in scan.files:
        if inc is not None and not inc.match_file(f.rel):
            scan.skipped.append(sources.Skip(f.display, "excluded", "matches no --include pattern"))
        elif exc is not None and exc.match_file(f.rel):
            scan.skipped.append(sources.Skip(f.display, "excluded", "matches an --exclude pattern"))
        else:
            kept.append(f)
    scan.files = kept
    return sources.read_scan(scan, options)


def file_count(document) -> int:
    """Files read into `document`: a repository's file sections, else the one file."""
    from .. import ingest as sources

    return len(sources.file_texts(document)) if document.kind == "repo" else 1


def choose_method(name: str | None, budget: str | None, loaded=None):
    """The named method; unnamed, `loaded`'s default (CombLlama where an adapter for it ships, else full)."""
    from ..core.methods import Budget, default_method, get_method

    if name is None and loaded is not None:
        return default_method(loaded, Budget.parse(budget))
    return get_method(name or "full", None, Budget.parse(budget))


def run_ingest(loaded, path, *, name=None, method=None, config=None, resume=False, force=False, quiet=False,
               document=None, plan=None):
    """Ingest `path` (or the already read `document` of it, with its `plan` if made) with progress on
    stderr; returns core.encode.IngestResult."""
    from .. import ingest as sources
    from ..core.encode import EncodeConfig, ingest
    from ..core.memory.store import MemoryStore
    from ..core.paths import Paths
    from .render import IngestProgress

    paths = Paths.from_env()
    paths.ensure(paths.memories)
    document = document if document is not None else sources.load(path)
    with graceful_interrupt() as should_stop, IngestProgress(f"ingest {document.name}", not quiet) as bar:
        return ingest(loaded, document, method, MemoryStore(paths.memories), name=name,
                      config=config or EncodeConfig(), resume=resume, force=force, on_progress=bar.update,
                      should_stop=should_stop, plan=plan)


def summary(result, files: int | None = None, wall: float | None = None) -> str:
    """The closing lines of an ingest: memory, then what was read and left out."""
    from .. import ingest as sources
    from .render import human_bytes

    s = result.stats
    head = ("reused identical memory" if result.reused else "resumed and sealed" if result.resumed else "sealed")
    rate = f" · {result.tokens_per_second:,.0f} tok/s" if result.tokens_per_second else ""
    line = (f"{head} {s['name']!r}: {s['tokens']:,} tokens in {s['chunks']} chunks · {human_bytes(s['bytes'])} "
            f"({s['bytes_per_token']:,.0f} B/token) · method {s['method']} · {result.seconds:.1f} s{rate}")
    skips = sources.skip_summary(result.skipped)
    read = [f"{files:,} file(s) read"] if files is not None else []
    read.append(f"{len(result.skipped):,} skipped" + (" (" + ", ".join(f"{r} {n:,}" for r, n in skips.items())
                                                      + "; --json lists each)" if skips else ""))
    if wall is not None:
        read.append(f"wall {wall:.1f} s")
    return line + "\n" + " · ".join(read)


def result_json(result, files: int | None = None, wall: float | None = None) -> dict:
    """The --json document of `ingest` (schema: docs/cli.md)."""
    from .. import ingest as sources

    return {"name": result.name, "path": result.path, "reused": result.reused, "resumed": result.resumed,
            "tokens_encoded": result.tokens_encoded, "seconds": round(result.seconds, 3),
            "wall_seconds": round(wall, 3) if wall is not None else None, "files": files,
            "tokens_per_second": round(result.tokens_per_second, 1) if result.tokens_per_second else None,
            "memory": result.stats, "skip_summary": sources.skip_summary(result.skipped),
            "skipped": [s.to_dict() for s in result.skipped], "warnings": result.warnings}


@click.command()
@click.argument("path", type=click.Path(exists=True, path_type=str))
@click.option("--name", default=None, help="Memory name (default: from the file name).")
@click.option("--method", default=None, help="Compression method (see `combllama methods`). Default: combllama where an adapter trained "
                   "for the model ships (the embedded SmolLM2), else full.")
@click.option("--budget", default=None, metavar="FRACTION|TOKENS",
              help="Memory budget: a fraction of the document (0.25) or a token count (4096).")
@click.option("--chunk-tokens", default=512, show_default=True, type=click.IntRange(16), help="Tokens per chunk.")
@click.option("--resume", is_flag=True, help="Continue an interrupted ingest of the same file and options.")
@click.option("--force", is_flag=True, help="Replace an existing memory of the same name.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary on stderr.")
@source_options
@model_options
@json_option
def ingest(path, name, method, budget, chunk_tokens, resume, force, quiet, include, exclude, password_stdin, spec,
           as_json):
    """Encode PATH (text, Markdown, PDF, EPUB, HTML or a code folder) into a memory on disk.

    \b
      combllama ingest book.pdf --name book
      combllama ingest notes.txt --method truncate --budget 2048
      combllama ingest ~/src/project --exclude 'tests/' --json
      pass show pdf | combllama ingest locked.pdf --password-stdin
    """
    import time

    from .. import ingest as sources
    from ..core.encode import EncodeConfig
    from .render import note, warn

    t0 = time.perf_counter()
    m = choose_method(method, budget)  # a bad name or budget fails before the model loads
    options = sources.IngestOptions(password=read_password(password_stdin))
    document = load_document(path, options, include, exclude)
    loaded = load(spec, quiet)
    if method is None:
        m = choose_method(None, budget, loaded)
    result = run_ingest(loaded, path, name=name, method=m, config=EncodeConfig(chunk_tokens=chunk_tokens),
                        resume=resume, force=force, quiet=quiet or as_json, document=document)
    wall = time.perf_counter() - t0
    files = file_count(document)
    for w in result.warnings:
        warn(w)
    if as_json:
        click.echo(json.dumps(result_json(result, files, wall), indent=2))
    elif not quiet:
        note(summary(result, files, wall))
