"""`combllama ask`: one question, answered from a memory (ingesting a path on the fly)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .options import json_option, load, model_options


def resolve_memory(loaded, target: str, method_name: str | None, budget: str | None, quiet: bool):
    """A memory reader for `target`: an existing memory name, or a path ingested now — or reused, under
    whatever name it was ingested, when a complete memory of the same content, model and settings exists."""
    from .. import ingest as sources
    from ..core.encode import EncodeConfig, plan_memory
    from ..core.memory.store import MemoryStore
    from ..core.paths import Paths
    from ..core.errors import BadInputError
    from .ingest_cmd import choose_method, run_ingest
    from .render import warn

    store = MemoryStore(Paths.from_env().memories)
    if not Path(target).exists() or (Path(target) / "MANIFEST.json").is_file():
        return store.open(target), None
    method = choose_method(method_name, budget, loaded)
    document = sources.load(target)  # read and tokenized once, whether reused or encoded
    try:
        plan = plan_memory(loaded, document, method, EncodeConfig())
    except BadInputError as e:
        if method_name is not None:
            raise
        # A one-shot question about a file too long for the window: say so, then keep what fits.
        warn(f"{e}; answering from the last tokens that fit (method truncate)")
        method = choose_method("truncate", budget)
        plan = plan_memory(loaded, document, method, EncodeConfig())
    found = store.find(plan.content_key)
    if found is not None:
        return found, None
    result = run_ingest(loaded, target, name=store.unique_name(Path(target.rstrip("/")).stem or "memory"),
                        method=method, quiet=quiet, document=document, plan=plan)
    return store.open(result.name), result


@click.command()
@click.argument("target", metavar="NAME_OR_PATH")
@click.argument("question")
@click.option("--method", default=None, help="Method when TARGET is a path that must be ingested.")
@click.option("--budget", default=None, metavar="FRACTION|TOKENS", help="Budget when TARGET is ingested now.")
@click.option("--max-tokens", default=512, show_default=True, type=click.IntRange(1), help="Answer length cap.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=None, type=int, help="Seed for sampling.")
@click.option("--stats", is_flag=True, help="Print token counts and speeds on stderr after the answer.")
@click.option("--no-cite", is_flag=True, help="Do not compute or print the sources of the answer.")
@click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors.")
@model_options
@json_option
def ask(target, question, method, budget, max_tokens, temperature, top_p, seed, stats, no_cite, quiet, spec, as_json):
    """Answer QUESTION from the memory NAME, or from the file PATH (ingested now, or reused).

    \b
      combllama ask book "Who keeps the lighthouse?"
      combllama ask notes.txt "What did we decide about the budget?" --json
    """
    from ..core.chat import Conversation, combine
    from ..core.engine import GenerateOptions
    from ..core.fast.load import attach_reader
    from ..core.prompt import turn_ids
    from ..core.tokenize import StreamDecoder
    from .render import note, safe
    from .sources import print_sources, source_records

    options = GenerateOptions(max_tokens, temperature, top_p, seed)
    t0 = time.perf_counter()
    loaded = load(spec, quiet or as_json)
    reader, ingested = resolve_memory(loaded, target, method, budget, quiet or as_json)
    t1 = time.perf_counter()
    memory = attach_reader(reader, loaded)
    attach_s = time.perf_counter() - t1
    conv = Conversation(loaded, combine(loaded, [(reader.name, reader.manifest, memory)]))
    engine = conv.engine
    ids = turn_ids(loaded.tokenizer, question)
    decoder = StreamDecoder(loaded.tokenizer)
    pieces, tokens = [], []
    tty = sys.stdout.isatty()
    for token in engine.generate(ids, options):
        tokens.append(token)
        piece = decoder.feed(token)
        pieces.append(piece)
        if not as_json and piece:
            sys.stdout.write(safe(piece) if tty else piece)
            sys.stdout.flush()
    answer = "".join(pieces) + decoder.flush()
    st = engine.stats.to_dict()
    cited = [] if no_cite else conv.cite(ids, tokens)
    record = {"memory": reader.name, "model": loaded.name, "question": question, "answer": answer,
              "usage": {"question_tokens": len(ids), "memory_tokens": memory.logical_length,
                        "output_tokens": st["new_tokens"]},
              "timings": {"load_s": round(loaded.load_seconds, 3), "attach_s": round(attach_s, 3),
                          "total_s": round(time.perf_counter() - t0, 3), **st},
              "ingested": bool(ingested and not ingested.reused)}
    if not no_cite:
        record["sources"] = source_records(cited)
    if as_json:
        click.echo(json.dumps(record, indent=2, ensure_ascii=False))
        return
    sys.stdout.write("\n")
    if not quiet:
        print_sources(cited)
    if stats and not quiet:
        note(f"question {len(ids)} tok · memory {memory.logical_length:,} tok · prefill {st['prefill_s']:.2f} s "
             f"({st['prefill_tok_s'] or 0:,.0f} tok/s) · decode {st['new_tokens']} tok "
             f"({st['decode_tok_s'] or 0:.1f} tok/s) · load {loaded.load_seconds:.2f} s · attach {attach_s:.2f} s · "
             f"{loaded.device} {str(loaded.dtype).removeprefix('torch.')}")
