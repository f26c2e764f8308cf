"""`combllama info` (one memory) and `combllama methods` (the registry)."""
from __future__ import annotations

import json

import click

from .options import json_option


@click.command()
@click.argument("name", metavar="NAME_OR_PATH")
@click.option("--verify", is_flag=True, help="Also check every chunk file's checksum and contents.")
@json_option
def info(name, verify, as_json):
    """Describe a memory: tokens, chunks, bytes, bytes/token, method, model."""
    from ..core.memory.store import MemoryStore
    from ..core.paths import Paths
    from .render import human_bytes, safe

    reader = MemoryStore(Paths.from_env().memories).open(name)
    stats = reader.stats()
    if verify:
        stats["problems"] = reader.verify()
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        if verify and stats["problems"]:
            raise SystemExit(6)  # the same status as without --json: scripts test it, not the text
        return
    rows = [("name", stats["name"]), ("source", f"{stats['source']} ({stats['kind']})"),
            ("state", stats["state"]), ("method", f"{stats['method']} {json.dumps(stats['params'])}"),
            ("model", f"{stats['model']} {stats['fingerprint'][:22]}…"),
            ("tokens", f"{stats['tokens']:,} (document {stats['document_tokens']:,})"),
            ("chunks", str(stats["chunks"])), ("bytes", f"{human_bytes(stats['bytes'])} ({stats['bytes_per_token']:,} B/token)"),
            ("kv dtype", str(stats["kv_dtype"])), ("created", str(stats["created_at"])), ("path", stats["path"])]
    if verify:
        rows.append(("verify", "ok" if not stats["problems"] else "; ".join(stats["problems"])))
    for k, v in rows:
        click.echo(f"{k:>9}  {safe(v)}")
    if verify and stats["problems"]:
        raise SystemExit(6)


@click.command()
@json_option
def methods(as_json):
    """List the registered methods and their options."""
    from dataclasses import fields

    from ..core.methods import METHODS

    rows = [{"name": n, "summary": c.summary, "kind": c.kind, "version": c.version,
             "options": {f.name: repr(f.default) for f in fields(c.Options)}} for n, c in METHODS.items()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "no options"
        click.echo(f"{r['name']:<12} {r['summary']}  [{opts}]")
