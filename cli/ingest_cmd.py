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


def choose_method(name: str | None, budget: str | None):
    from ..core.methods import Budget, get_method

    return get_method(name or "full", None, Budget.parse(budget))


def run_ingest(loaded, path, *, name=None, method=None, config=None, resume=False, force=False, quiet=False):
    """Ingest `path` with progress on stderr; returns core.encode.IngestResult."""
    from .. import ingest as sources
    from ..core.encode import EncodeConfig, ingest
    from ..core.memory.store import MemoryStore
    from ..core.paths import Paths
    from .render import IngestProgress

    paths = Paths.from_env()
    paths.ensure(paths.memories)
    document = sources.load(path)
    with graceful_interrupt() as should_stop, IngestProgress(f"ingest {document.name}", not quiet) as bar:
        return ingest(loaded, document, method, MemoryStore(paths.memories), name=name,
                      config=config or EncodeConfig(), resume=resume, force=force, on_progress=bar.update,
                      should_stop=should_stop)


def summary(result) -> str:
    from .render import human_bytes

    s = result.stats
    head = ("reused identical memory" if result.reused else "resumed and sealed" if result.resumed else "sealed")
    rate = f" · {result.tokens_per_second:,.0f} tok/s" if result.tokens_per_second else ""
    return (f"{head} {s['name']!r}: {s['tokens']:,} tokens in {s['chunks']} chunks · {human_bytes(s['bytes'])} "
            f"({s['bytes_per_token']:,.0f} B/token) · method {s['method']} · {result.seconds:.1f} s{rate}")


def result_json(result) -> dict:
    return {"name": result.name, "path": result.path, "reused": result.reused, "resumed": result.resumed,
            "tokens_encoded": result.tokens_encoded, "seconds": round(result.seconds, 3),
            "tokens_per_second": round(result.tokens_per_second, 1) if result.tokens_per_second else None,
            "memory": result.stats, "skipped": [s.to_dict() for s in result.skipped], "warnings": result.warnings}


@click.command()
@click.argument("path", type=click.Path(exists=True, path_type=str))
@click.option("--name", default=None, help="Memory name (default: from the file name).")
@click.option("--method", default=None, help="Compression method (see `combllama methods`). Default: full.")
@click.option("--budget", default=None, metavar="FRACTION|TOKENS",
              help="Memory budget: a fraction of the document (0.25) or a token count (4096).")
@click.option("--chunk-tokens", default=512, show_default=True, type=click.IntRange(16), help="Tokens per chunk.")
@click.option("--resume", is_flag=True, help="Continue an interrupted ingest of the same file and options.")
@click.option("--force", is_flag=True, help="Replace an existing memory of the same name.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary on stderr.")
@model_options
@json_option
def ingest(path, name, method, budget, chunk_tokens, resume, force, quiet, spec, as_json):
    """Encode PATH (a text or Markdown file) into a memory on disk.

    \b
      combllama ingest book.md --name book
      combllama ingest notes.txt --method truncate --budget 2048
    """
    from ..core.encode import EncodeConfig
    from .render import note, warn

    m = choose_method(method, budget)
    loaded = load(spec, quiet)
    result = run_ingest(loaded, path, name=name, method=m, config=EncodeConfig(chunk_tokens=chunk_tokens),
                        resume=resume, force=force, quiet=quiet or as_json)
    for w in result.warnings:
        warn(w)
    if as_json:
        click.echo(json.dumps(result_json(result), indent=2))
    elif not quiet:
        note(summary(result))
