"""The directory of memories: names, lookup by content key, listing and removal. No torch."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import BadInputError, CombllamaError, MemoryNotFoundError
from .bundle import MANIFEST, MemoryReader, remove_bundle
from .durable import fsync_dir

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise BadInputError(f"invalid memory name {name!r}: use letters, digits, '.', '_' and '-' (max 100)")
    return name


def name_from(text: str) -> str:
    """A valid memory name derived from a file or folder name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "memory"
    return stem[:100]


class MemoryStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.finish_replacements()

    def finish_replacements(self) -> list[str]:
        """Roll forward a `--force` replacement killed between its two renames (replace_bundle): the old
        memory is already renamed away and the new one is sealed under its staging name, so put it in
        place. Returns the names finished."""
        done = []
        if not self.root.is_dir():
            return done
        for staging in self.root.glob(".*.replacing"):
            name = staging.name[1:-len(".replacing")]
            if not _NAME.match(name) or (self.root / name).exists():
                continue
            try:
                if MemoryReader(staging).complete:
                    os.replace(staging, self.root / name)
                    fsync_dir(self.root)
                    done.append(name)
            except (CombllamaError, OSError):
                continue  # unreadable or read-only: left for `--force` (clear_leftovers) to remove
        return done

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / MANIFEST).is_file()

    def open(self, name_or_path: str | Path) -> MemoryReader:
        """A memory by name, or a bundle directory given by path."""
        p = Path(name_or_path)
        if isinstance(name_or_path, str) and _NAME.match(name_or_path) and (self.root / name_or_path).is_dir():
            return MemoryReader(self.root / name_or_path)
        if p.exists():
            return MemoryReader(p)
        raise MemoryNotFoundError(f"no memory named {str(name_or_path)!r} (see `combllama memories list`)")

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and (p / MANIFEST).is_file())

    def readers(self) -> list[MemoryReader | CombllamaError]:
        """Every memory, or the error that makes it unreadable (listing never stops at a bad one)."""
        out: list = []
        for n in self.names():
            try:
                out.append(MemoryReader(self.root / n))
            except CombllamaError as e:
                out.append(e)
        return out

    def find(self, content_key: str) -> MemoryReader | None:
        """The complete memory built from this exact content, model, method and settings, if any."""
        for r in self.readers():
            if isinstance(r, MemoryReader) and r.manifest.get("content_key") == content_key and r.complete:
                return r
        return None

    def unique_name(self, base: str) -> str:
        name, i = check_name(name_from(base)), 2
        while (self.root / name).exists():
            name = f"{name_from(base)[:95]}-{i}"
            i += 1
        return name

    def clear_leftovers(self, name: str) -> Path:
        """Remove the staging bundle a killed `--force` replacement of `name` left, and return its path for a
        new one (renamed-away old bundles are swept by MemoryWriter.create). One still being written is
        locked: busy."""
        staging = self.root / f".{check_name(name)}.replacing"
        if staging.exists():
            remove_bundle(staging)
        return staging

    def remove(self, name: str) -> None:
        p = self.path(name)
        if not p.is_dir():
            raise MemoryNotFoundError(f"no memory named {name!r}")
        remove_bundle(p)
