"""Option resolution: flag > COMBLLAMA_<COMMAND>_<OPTION> > config.toml [command] > [default] > built-in default."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from combllama.cli.main import cli

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "lighthouse.md"


@pytest.fixture
def config(isolated_home):
    path = isolated_home / "config" / "config.toml"
    path.parent.mkdir(parents=True)
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    for i in range(5):
        (root / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))
    return root


def top_count(*args) -> int:
    r = CliRunner().invoke(cli, ["count", *args, "--json", "-q"])
    assert r.exit_code == 0, r.output
    return len(json.loads(r.stdout)["documents"][0]["largest"])


def test_precedence_for_a_subcommand_option(config, folder, tiny_dir, monkeypatch):
    assert top_count(str(folder), "--model", str(tiny_dir)) == 5  # built-in default 10, capped by 5 files
    config.write_text(f'[default]\nmodel = "{tiny_dir}"\ntop = 1\n')
    assert top_count(str(folder)) == 1  # [default] gives both the model and the option
    config.write_text(f'[default]\nmodel = "{tiny_dir}"\ntop = 1\n\n[count]\ntop = 2\n')
    assert top_count(str(folder)) == 2  # the command's table beats [default]
    monkeypatch.setenv("COMBLLAMA_COUNT_TOP", "3")
    assert top_count(str(folder)) == 3  # the variable beats config.toml
    assert top_count(str(folder), "--top", "4") == 4  # the flag beats everything


def test_model_from_env(folder, tiny_dir, monkeypatch):
    monkeypatch.setenv("COMBLLAMA_COUNT_MODEL", str(tiny_dir))
    r = CliRunner().invoke(cli, ["count", str(folder), "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"]["name"] == tiny_dir.name


def test_nested_subcommand_table_and_variable(config, monkeypatch):
    r = CliRunner().invoke(cli, ["memories", "prune", "--older-than", "1d", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["dry_run"] is False
    config.write_text('[memories.prune]\ndry_run = true\n')
    r = CliRunner().invoke(cli, ["memories", "prune", "--older-than", "1d", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["dry_run"] is True
    config.write_text("")
    monkeypatch.setenv("COMBLLAMA_MEMORIES_PRUNE_DRY_RUN", "1")
    r = CliRunner().invoke(cli, ["memories", "prune", "--older-than", "1d", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["dry_run"] is True


def test_flag_value_from_config(config, monkeypatch):
    config.write_text("[paths]\njson = true\n")  # the --json flag by its option name
    r = CliRunner().invoke(cli, ["paths"])
    assert r.exit_code == 0 and isinstance(json.loads(r.stdout), list)


def test_unknown_key_warns_and_bad_toml_fails(config):
    config.write_text("[paths]\nbogus = 1\n")
    r = CliRunner().invoke(cli, ["paths"])
    assert r.exit_code == 0 and "[paths] has no option 'bogus'" in r.stderr
    config.write_text("[paths\njson = ")
    r = CliRunner().invoke(cli, ["paths"])
    assert r.exit_code == 3 and "config.toml: not valid TOML" in r.stderr
    config.write_text("paths = 1\n")
    r = CliRunner().invoke(cli, ["paths"])
    assert r.exit_code == 3 and "must be a table" in r.stderr


def test_option_keys_cover_every_long_option():
    """Every option of every command with a module is reachable from config.toml by its long name."""
    import click

    from combllama.cli.config import option_keys
    from combllama.cli.main import COMMANDS

    ctx = click.Context(cli)
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        if command is None:  # a command whose module another change has not landed yet
            continue
        commands = [command] + (list(command.commands.values()) if isinstance(command, click.Group) else [])
        for c in commands:
            keys = option_keys(c)
            for p in c.params:
                if isinstance(p, click.Option):
                    for opt in p.opts:
                        if opt.startswith("--"):
                            assert keys[opt[2:].replace("-", "_")] == p.name
