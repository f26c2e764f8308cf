"""`combllama memories list|info|rm|prune`: the memories on disk, listed, described, removed, pruned.

"Last used" is the access time of a memory's token file, which every load of the memory reads (on a
file system mounted noatime it stays at the creation time, so pruning by age degrades to pruning
oldest-created first). Removal goes through the bundle lock: a memory being written is never deleted.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
from pathlib import Path

import click

from .info_cmd import info
from .options import json_option

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000 ** 2, "mb": 1000 ** 2, "mib": 1024 ** 2,
          "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1024 ** 3, "t": 1000 ** 4, "tb": 1000 ** 4, "tib": 1024 ** 4}
_AGES = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """'50GiB', '1.5 GB', '800M', '1024' → bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise click.BadParameter(f"{text!r} is not a size like 50GiB, 800MB or 1024")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_age(text: str) -> float:
    """'30d', '12h', '2w', '90m', '45s' → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not m:
        raise click.BadParameter(f"{text!r} is not an age like 30d, 12h, 2w")
    return float(m.group(1)) * _AGES[m.group(2)]


def disk_bytes(root: Path) -> int:
    """Bytes of every regular file under `root` (partial chunks and staging files included)."""
    total = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            total += st.st_size
    return total


def last_used(root: Path) -> float:
    """When the memory was last loaded (token file atime), or written (manifest mtime), whichever is later."""
    from ..core.memory.bundle import MANIFEST, TOKENS

    times = []
    for name, attr in ((TOKENS, "st_atime"), (MANIFEST, "st_mtime")):
        try:
            times.append(getattr(os.stat(root / name), attr))
        except OSError:
            pass
    return max(times) if times else 0.0


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def entries(store) -> list[dict]:
    """One record per memory (schema: docs/cli.md); an unreadable memory carries its "error"."""
    from ..core.errors import CombllamaError
    from ..core.memory.bundle import MemoryReader

    keys = ("name", "state", "method", "model", "source", "kind", "tokens", "chunks", "bytes", "bytes_per_token",
            "created_at")
    out = []
    for name in store.names():
        root = store.root / name
        try:
            s = MemoryReader(root).stats()
            rec = {k: s[k] for k in keys} | {"error": None}
        except CombllamaError as e:
            rec = {k: None for k in keys} | {"name": name, "state": "unreadable", "error": str(e)}
        rec |= {"dir": name, "path": str(root), "disk_bytes": disk_bytes(root), "last_used": _iso(last_used(root))}
        out.append(rec)
    return out


def interactive() -> bool:
    """Whether a person can answer a question (stdin and stderr are terminals)."""
    return sys.stdin.isatty() and sys.stderr.isatty()


@click.group()
def memories():
    """List, describe, remove and prune the memories on disk.

    \b
      combllama memories list
      combllama memories info book
      combllama memories rm book -y
      combllama memories prune --older-than 30d --max-size 50GiB --dry-run
    """


@memories.command("list")
@json_option
def list_(as_json):
    """List every memory: name, state, method, tokens, size, last use.

    A table on a terminal, tab-separated values (with a header line) when piped.
    """
    from ..core.memory.store import MemoryStore
    from ..core.paths import Paths
    from .render import human_bytes, safe

    rows = entries(MemoryStore(Paths.from_env().memories))
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    cols = ("name", "state", "method", "model", "tokens", "bytes", "last_used", "source")
    if not sys.stdout.isatty():
        click.echo("\t".join(cols))
        for r in rows:
            click.echo("\t".join(_tsv(r.get(c)) for c in cols))
        return
    if not rows:
        click.echo("no memories yet (combllama ingest PATH)")
        return
    table = [("NAME", "STATE", "METHOD", "MODEL", "TOKENS", "SIZE", "LAST USED", "SOURCE")]
    for r in rows:
        table.append((r["name"], r["state"], r.get("method") or "", r.get("model") or "",
                      f"{r['tokens']:,}" if r.get("tokens") is not None else "",
                      human_bytes(r["disk_bytes"]), r["last_used"].replace("T", " ")[:16],
                      r.get("source") or r.get("error") or ""))
    widths = [max(len(safe(str(row[i]))) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(safe(str(v)).ljust(w) if i not in (4, 5) else safe(str(v)).rjust(w)
                             for i, (v, w) in enumerate(zip(row, widths))).rstrip())


def _tsv(v) -> str:
    from .render import safe

    return "" if v is None else safe(str(v)).replace("\t", " ").replace("\n", " ")


memories.add_command(info, "info")


@memories.command()
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def rm(names, yes):
    """Remove memories. Asks first on a terminal unless -y; sessions that used them keep their turns.

    \b
      combllama memories rm book -y
    """
    from ..core.errors import MemoryNotFoundError
    from ..core.memory.store import MemoryStore
    from ..core.paths import Paths
    from .render import human_bytes, note

    store = MemoryStore(Paths.from_env().memories)
    for n in names:  # check every name before deleting any
        if not store.path(n).is_dir():
            raise MemoryNotFoundError(f"no memory named {n!r} (see `combllama memories list`)")
    if not yes and interactive():
        size = sum(disk_bytes(store.path(n)) for n in names)
        click.confirm(f"remove {len(names)} memory(ies) ({human_bytes(size)}): {', '.join(names)}?", abort=True,
                      err=True)
    for n in names:
        store.remove(n)
        note(f"removed {n}")


@memories.command()
@click.option("--older-than", default=None, metavar="AGE", help="Remove memories not used for AGE (30d, 12h, 2w).")
@click.option("--max-size", default=None, metavar="SIZE",
              help="Then remove least recently used memories until all fit in SIZE (50GiB, 800MB).")
@click.option("--dry-run", is_flag=True, help="Only print what would be removed.")
@json_option
def prune(older_than, max_size, dry_run, as_json):
    """Remove memories not used lately, least recently used first; never one being written.

    \b
      combllama memories prune --older-than 30d
      combllama memories prune --max-size 50GiB --dry-run
    """
    import time

    from ..core.errors import BadInputError, BusyError
    from ..core.memory.bundle import remove_bundle
    from ..core.memory.store import MemoryStore
    from ..core.paths import Paths
    from .render import human_bytes, note, warn

    if older_than is None and max_size is None:
        raise BadInputError("prune needs --older-than AGE, --max-size SIZE or both")
    age = parse_age(older_than) if older_than else None
    cap = parse_size(max_size) if max_size else None
    store = MemoryStore(Paths.from_env().memories)
    rows = []
    for r in entries(store):
        if r["error"] is None:
            rows.append(r)
        else:
            warn(f"{r['dir']}: unreadable, not pruned ({r['error']}); remove it with `combllama memories rm`")
    used = {r["dir"]: last_used(Path(r["path"])) for r in rows}
    rows.sort(key=lambda r: (used[r["dir"]], r["dir"]))  # least recently used first
    now = time.time()
    chosen: list[tuple[dict, str]] = []
    for r in rows:
        if age is not None and now - used[r["dir"]] > age:
            chosen.append((r, f"unused for {older_than}"))
    if cap is not None:
        left = sum(r["disk_bytes"] for r in rows) - sum(r["disk_bytes"] for r, _ in chosen)
        for r in rows:
            if left <= cap:
                break
            if all(r is not c for c, _ in chosen):
                chosen.append((r, f"over --max-size {max_size}"))
                left -= r["disk_bytes"]
    done = []
    for r, why in chosen:
        status = "would remove" if dry_run else "removed"
        if not dry_run:
            try:
                remove_bundle(Path(r["path"]), lock_timeout=0)
            except BusyError:
                status = "busy"  # being written right now: never pulled from under its writer
        done.append({"name": r["dir"], "last_used": r["last_used"], "disk_bytes": r["disk_bytes"], "reason": why,
                     "status": status})
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "removed": done}, indent=2))
        return
    for d in done:
        click.echo(f"{d['status']:<12} {d['name']}  {human_bytes(d['disk_bytes'])}  last used {d['last_used']}  "
                   f"({d['reason']})")
    freed = sum(d["disk_bytes"] for d in done if d["status"] != "busy")
    note(f"{'would free' if dry_run else 'freed'} {human_bytes(freed)} from {len(done)} memory(ies)"
         if done else "nothing to prune")
