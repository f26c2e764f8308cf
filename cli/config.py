"""config.toml → click's `default_map`, built once per run in the group callback.

Precedence is click's own: a flag on the command line, then the variable COMBLLAMA_<COMMAND>_<OPTION>
(click's auto_envvar_prefix), then config.toml's [<command>] table, then its [default] table, then
the built-in default. Keys are option names with '_' or '-' (`chunk_tokens`, `chunk-tokens`).
Subcommands are nested tables: `[memories.prune] older_than = "30d"`. No heavy imports.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

FILE = "config.toml"
DEFAULT = "default"  # the table every command reads for options it has


@dataclass(frozen=True)
class Config:
    path: Path | None  # None: no file
    tables: dict[str, Any] = field(default_factory=dict)  # TOML tables, as parsed

    def __post_init__(self) -> None:
        from ..core.errors import BadInputError

        for name, table in self.tables.items():
            if not isinstance(table, dict):
                raise BadInputError(f"{self.path}: {name!r} must be a table like [{name}], not a bare value")

    @classmethod
    def from_toml(cls, path: Path) -> "Config":
        """Parse `path`; a missing file is an empty config, a malformed one a bad-input error (exit 3)."""
        from ..core.errors import BadInputError

        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls(None)
        except OSError as e:
            raise BadInputError(f"{path}: cannot read ({e.strerror or e})") from None
        try:
            tables = tomllib.loads(data.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise BadInputError(f"{path}: not valid TOML ({e})") from None
        return cls(path, tables)

    @classmethod
    def load(cls) -> "Config":
        from ..core.paths import Paths

        return cls.from_toml(Paths.from_env().config / FILE)

    def model_dirs(self) -> list[str]:
        """Every `model = "..."` set in any table (what `combllama models` lists)."""
        found: list[str] = []

        def walk(table: dict) -> None:
            for k, v in table.items():
                if isinstance(v, dict):
                    walk(v)
                elif k == "model" and isinstance(v, str) and v not in found:
                    found.append(v)

        walk(self.tables)
        return found

    def default_map(self, command: click.Command, name: str, ctx: click.Context,
                    warn: Callable[[str], None]) -> dict[str, Any]:
        """click's default_map for running `command` (named `name`): its table over [default]."""
        return _map(command, self.tables.get(name, {}), self.tables.get(DEFAULT, {}), name, ctx, warn,
                    self.path)


def option_keys(command: click.Command) -> dict[str, str]:
    """config key → click parameter name: the parameter's own name and each long option name."""
    keys: dict[str, str] = {}
    for p in command.params:
        if not isinstance(p, click.Option) or p.name is None:
            continue
        keys[p.name] = p.name
        for opt in p.opts + p.secondary_opts:
            if opt.startswith("--"):
                keys.setdefault(opt[2:].replace("-", "_"), p.name)
    return keys


def _map(command: click.Command, table: dict, defaults: dict, where: str, ctx: click.Context,
         warn: Callable[[str], None], path: Path | None) -> dict[str, Any]:
    keys = option_keys(command)
    out: dict[str, Any] = {}
    for k, v in defaults.items():  # [default] holds options of every command: take the ones this has
        if not isinstance(v, dict) and k.replace("-", "_") in keys:
            out[keys[k.replace("-", "_")]] = v
    subcommands = {}
    if isinstance(command, click.Group):
        subcommands = {n: command.get_command(ctx, n) for n in command.list_commands(ctx)}
    for k, v in table.items():
        key = k.replace("-", "_")
        if isinstance(v, dict) and subcommands.get(k) is not None:
            continue
        if key in keys:
            out[keys[key]] = v
        else:
            warn(f"{path}: [{where}] has no option {k!r}; ignored")
    for n, sub in subcommands.items():
        if sub is not None:
            sub_map = _map(sub, table.get(n, {}) if isinstance(table.get(n), dict) else {}, defaults,
                           f"{where}.{n}", ctx, warn, path)
            if sub_map:
                out[n] = sub_map
    return out


def install(ctx: click.Context) -> None:
    """Give the command about to run its defaults from config.toml (call from the group callback)."""
    name = ctx.invoked_subcommand
    if name is None:
        return
    command = ctx.command.get_command(ctx, name)  # type: ignore[attr-defined]
    if command is None:
        return
    config = Config.load()
    if config.path is None:
        return
    from .render import warn

    ctx.default_map = {name: config.default_map(command, name, ctx, warn)}
