"""The `combllama` click group, its lazily imported commands, and the ONE place where errors become
one-line messages and exit codes.

Heavy modules (torch, transformers, core) are imported inside command bodies so that
`combllama --help` starts in a fraction of a second.
"""
from __future__ import annotations

import importlib
import sys

import click

# name → "module:function"; a command's module is imported only when that command runs.
COMMANDS = {
    "ingest": "combllama.cli.ingest_cmd:ingest",
    "ask": "combllama.cli.ask_cmd:ask",
    "info": "combllama.cli.info_cmd:info",
    "methods": "combllama.cli.info_cmd:methods",
}

EXIT_CODES = """\b
Exit codes:
  0 ok · 1 internal error · 2 usage error · 3 bad input · 4 resource limit
  5 memory from another model · 6 corrupt memory · 7 memory from a newer combllama
  8 not a combllama memory · 75 busy (locked by another process) · 130 interrupted"""


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"],
                                                                 "auto_envvar_prefix": "COMBLLAMA"})
@click.version_option(package_name="combllama")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks for internal errors.")
@click.pass_context
def cli(ctx, verbose):
    """Ask questions about books, PDFs and code repositories from a compressed memory on disk.

    \b
      combllama ingest book.md            # encode once → a named memory
      combllama ask book "Who is Ada?"    # answer from the memory
      combllama ask notes.txt "Summary?"  # ingests on the fly, reuses by content hash
    """
    ctx.ensure_object(dict)["verbose"] = verbose


def _fail(message: str, code: int) -> None:
    from .render import error

    error(message)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    from ..core.errors import CombllamaError

    verbose = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="combllama", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _fail("interrupted", 130)
    except BrokenPipeError:
        sys.stderr.close()  # a closed pipe (`| head`) is not an error worth a message
        sys.exit(0)
    except Exception as e:  # typed errors of core, ingest and sessions carry their exit code
        code = getattr(e, "exit_code", None)
        if isinstance(e, CombllamaError) or (isinstance(code, int) and type(e).__module__.startswith("combllama.")):
            _fail(str(e), code)
        if verbose:
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (run with -v for the traceback)", 1)
