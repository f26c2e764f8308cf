"""The command registry against --help and docs/cli.md, and a fast start: heavy imports only inside commands."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from combllama.cli.main import COMMANDS, cli

ROOT = Path(__file__).resolve().parents[2]


def entry_point() -> list[str]:
    script = Path(sys.executable).parent / "combllama"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from combllama.cli.main import main; main()"]


def test_help_starts_in_under_half_a_second(tmp_path):
    env = {**os.environ, "COMBLLAMA_HOME": str(tmp_path)}
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        out = subprocess.run(entry_point() + ["--help"], capture_output=True, text=True, env=env, timeout=60)
        best = min(best, time.perf_counter() - t0)
        assert out.returncode == 0 and "Usage:" in out.stdout
    assert best < 0.5, f"combllama --help took {best:.3f} s (best of 3)"


@pytest.mark.parametrize("args", [["--help"], ["ingest", "--help"], ["count", "--help"], ["memories", "--help"],
                                  ["doctor", "--help"]])
def test_help_imports_nothing_heavy(args, tmp_path):
    code = ("import sys\nfrom combllama.cli.main import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'rich', 'tokenizers') if m in sys.modules)\n"
            "print('HEAVY', heavy)" % (args,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COMBLLAMA_HOME": str(tmp_path)})
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_every_registered_command_is_in_help_and_docs():
    r = CliRunner().invoke(cli, ["--help"])
    docs = (ROOT / "docs" / "cli.md").read_text()
    for name in COMMANDS:
        assert f"  {name}" in r.stdout or cli.get_command(None, name) is None
        assert f"`combllama {name}" in docs, f"docs/cli.md does not document {name}"


def test_exit_code_table_matches_the_errors():
    """docs/cli.md's exit-code table lists every code an error type or the group can produce."""
    from combllama.core import errors

    docs = (ROOT / "docs" / "cli.md").read_text()
    codes = {c.exit_code for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.CombllamaError)}
    for code in codes | {0, 2}:
        assert f"| {code} |" in docs, f"exit code {code} missing from docs/cli.md"
