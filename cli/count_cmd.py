"""`combllama count`: files, skips, model tokens and the memory each method would need — no weights loaded."""
from __future__ import annotations

import json
import time

import click

from .ingest_cmd import source_options
from .options import json_option, model_options


def tree_rows(files: list[tuple[str, int]], root: str) -> list[tuple[int, str, int]]:
    """(depth, label, tokens): folders (with '/', totals rolled up) and files, in path order."""
    dirs: dict[tuple[str, ...], int] = {}
    for path, n in files:
        parts = tuple(path.split("/"))
        for i in range(1, len(parts)):
            dirs[parts[:i]] = dirs.get(parts[:i], 0) + n
    entries = {key: (key[-1] + "/", n) for key, n in dirs.items()}
    for path, n in files:
        entries[tuple(path.split("/"))] = (path.rsplit("/", 1)[-1], n)
    rows = [(0, root, sum(n for _, n in files))]
    rows += [(len(key), label, n) for key, (label, n) in sorted(entries.items())]
    return rows


def report(path: str, document, counted, estimates, top: int) -> dict:
    """The JSON record of one PATH (schema: docs/cli.md)."""
    from .. import ingest as sources

    per_file: dict[str, dict] = {}
    overhead = 0
    for sec in counted.sections:
        if document.kind == "repo" and sec.title == "directory tree":
            overhead += sec.tokens  # the tree heading every repository memory
            continue
        entry = per_file.setdefault(sec.path, {"path": sec.path, "chars": 0, "tokens": 0})
        entry["chars"] += sec.chars
        entry["tokens"] += sec.tokens
    files = list(per_file.values())
    largest = sorted(files, key=lambda f: -f["tokens"])[:top]
    doc_tokens = counted.tokens
    return {
        "path": path, "name": document.name, "kind": document.kind, "files": len(files), "chars": counted.chars,
        "tokens": doc_tokens, "tree_tokens": overhead, "prefix_tokens": counted.prefix_tokens,
        "skip_summary": sources.skip_summary(document.skipped),
        "skipped": [s.to_dict() for s in document.skipped], "warnings": list(document.warnings),
        "largest": largest, "per_file": files,
        "estimates": [{"method": e.method, "memory_tokens": e.memory_tokens, "bytes": e.bytes,
                       "bytes_per_document_token": round(e.bytes / doc_tokens, 1) if e.bytes and doc_tokens else None,
                       "fits": e.bytes is not None, "note": e.note} for e in estimates],
    }


def render_text(rec: dict, with_tree: bool, echo) -> None:
    from .render import human_bytes, safe

    echo(safe(f"{rec['name']} ({rec['kind']}) · {rec['files']:,} file(s) · {rec['tokens']:,} tokens · "
              f"{rec['chars']:,} characters"))
    skips = rec["skip_summary"]
    if skips:
        echo(f"skipped {len(rec['skipped']):,}: " + ", ".join(f"{r} {n:,}" for r, n in skips.items()))
        for reason in skips:
            examples = [s for s in rec["skipped"] if s["reason"] == reason][:3]
            more = skips[reason] - len(examples)
            tail = f" … (+{more:,})" if more else ""
            echo(safe(f"  {reason:<14} " + ", ".join(s["path"] for s in examples) + tail))
    else:
        echo("skipped 0")
    for w in rec["warnings"][:5]:
        echo(safe(f"warning: {w}"))
    if len(rec["warnings"]) > 5:
        echo(f"… {len(rec['warnings']) - 5:,} more warnings (--json lists each)")
    if rec["kind"] == "repo" and rec["largest"]:
        echo(f"largest {len(rec['largest'])} file(s):")
        for f in rec["largest"]:
            echo(safe(f"  {f['tokens']:>12,}  {f['path']}"))
    if with_tree and rec["kind"] == "repo":
        echo("tree (tokens):")
        for depth, label, n in tree_rows([(f["path"], f["tokens"]) for f in rec["per_file"]], rec["name"]):
            echo(safe(f"  {n:>12,}  {'  ' * depth}{label}"))
    echo("memory estimate:")
    for e in rec["estimates"]:
        if e["fits"]:
            echo(f"  {e['method']:<12} {e['memory_tokens']:>12,} tokens  {human_bytes(e['bytes']):>10}")
        else:
            echo(safe(f"  {e['method']:<12} {'—':>12}         {'—':>10}  {e['note']}"))


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=str), metavar="PATH...")
@click.option("--tree", "show_tree", is_flag=True, help="Also print the folder tree with token totals.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(0),
              help="How many of the largest files to list.")
@click.option("--budget", default=None, metavar="FRACTION|TOKENS", help="Budget the memory estimates assume.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@source_options
@model_options
@json_option
def count(paths, show_tree, top, budget, quiet, include, exclude, password_stdin, spec, as_json):
    """Count files, skips and model tokens of each PATH, and the memory each method would need.

    Uses the model's own tokenizer; never loads model weights.

    \b
      combllama count book.pdf
      combllama count ~/src/project --tree --top 20
      combllama count notes/ docs/ --json
    """
    from .. import ingest as sources
    from ..core.count import count_document, estimate_memory
    from ..core.methods import Budget
    from ..core.model import load_tokenizer
    from .ingest_cmd import load_document, read_password
    from .render import note

    t0 = time.perf_counter()
    parsed_budget = Budget.parse(budget)
    options = sources.IngestOptions(password=read_password(password_stdin))
    info = load_tokenizer(spec)
    t_tok = time.perf_counter() - t0
    records, read_s, tok_s = [], 0.0, 0.0
    for path in paths:
        if not quiet:
            note(f"reading {path} …")
        t1 = time.perf_counter()
        document = load_document(path, options, include, exclude)
        t2 = time.perf_counter()
        if not quiet:
            note(f"tokenizing {sum(len(s.text) for s in document.sections):,} characters with the {info.name} tokenizer …")
        counted = count_document(info.tokenizer, document)
        t3 = time.perf_counter()
        read_s, tok_s = read_s + t2 - t1, tok_s + t3 - t2
        estimates = estimate_memory(info, counted.tokens, counted.prefix_tokens, parsed_budget)
        records.append(report(path, document, counted, estimates, top))
    total = {"files": sum(r["files"] for r in records), "tokens": sum(r["tokens"] for r in records),
             "chars": sum(r["chars"] for r in records), "skipped": sum(len(r["skipped"]) for r in records),
             "skip_summary": sources.skip_summary([sources.Skip(s["path"], s["reason"]) for r in records
                                                   for s in r["skipped"]])}
    seconds = {"tokenizer_load": round(t_tok, 3), "read": round(read_s, 3), "tokenize": round(tok_s, 3),
               "total": round(time.perf_counter() - t0, 3)}
    model = {"name": info.name, "directory": str(info.directory), "window": info.window, "n_layers": info.n_layers,
             "n_kv_heads": info.n_kv_heads, "head_dim": info.head_dim, "kv_dtype": info.kv_dtype,
             "kv_bytes_per_token": info.kv_bytes_per_token}
    if as_json:
        click.echo(json.dumps({"model": model, "documents": records, "total": total, "seconds": seconds}, indent=2,
                              ensure_ascii=False))
        return
    for i, rec in enumerate(records):
        if i:
            click.echo()
        render_text(rec, show_tree, click.echo)
    if len(records) > 1:
        click.echo(f"\ntotal · {total['files']:,} file(s) · {total['tokens']:,} tokens · "
                   f"{total['skipped']:,} skipped")
    if not quiet:
        note(f"{info.name} tokenizer · {info.kv_dtype} KV · {info.kv_bytes_per_token:,} B/token uncompressed · "
             f"{seconds['total']:.1f} s (read {seconds['read']:.1f} s, tokenize {seconds['tokenize']:.1f} s)")
