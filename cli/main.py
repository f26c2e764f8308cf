"""The `combllama` click group, its lazily imported commands, and the ONE place where errors become
one-line messages and exit codes.

Heavy modules (torch, transformers, core) are imported inside command bodies so that
`combllama --help` starts in a fraction of a second.
"""
from __future__ import annotations

import importlib
import sys
import warnings

import click

# name → "module:function"; a command's module is imported only when that command runs.
COMMANDS = {
    "ingest": "combllama.cli.ingest_cmd:ingest",
    "ask": "combllama.cli.ask_cmd:ask",
    "info": "combllama.cli.info_cmd:info",
    "methods": "combllama.cli.info_cmd:methods",
    "chat": "combllama.cli.chat_cmd:chat",
    "sessions": "combllama.cli.sessions_cmd:sessions",
    "count": "combllama.cli.count_cmd:count",
    "memories": "combllama.cli.memories_cmd:memories",
    "models": "combllama.cli.misc_cmd:models",
    "paths": "combllama.cli.misc_cmd:paths",
    "doctor": "combllama.cli.misc_cmd:doctor",
}

EXIT_CODES = """\b
Exit codes:
  0 ok · 1 internal error · 2 usage error · 3 bad input · 4 resource limit
  5 memory from another model · 6 corrupt memory · 7 memory from a newer combllama
  8 not a combllama memory · 75 busy (locked by another process) · 130 interrupted"""


class UserError(click.ClickException):
    """A typed error of core, ingest or sessions on its way out: one line on stderr, its exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        from .render import error

        error(self.message)


def _is_typed(e: BaseException) -> bool:
    """Errors of our packages that carry an exit code (core.errors, ingest.errors, sessions.errors)."""
    return isinstance(getattr(e, "exit_code", None), int) and type(e).__module__.startswith("combllama.")


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            return None  # a command whose module is not written yet

    def invoke(self, ctx):
        """The one place where failures become messages and exit codes."""
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            raise UserError("interrupted", 130) from None
        except BrokenPipeError:
            sys.stderr.close()  # `combllama ... | head` closed the pipe: not an error worth a message
            raise click.exceptions.Exit(0) from None
        except Exception as e:
            if _is_typed(e):
                raise UserError(str(e), e.exit_code) from None
            if (ctx.obj or {}).get("verbose"):
                raise
            raise UserError(f"internal error: {type(e).__name__}: {e} (run with -v for the traceback)", 1) from None


@click.group(cls=LazyGroup, epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"],
                                                                 "auto_envvar_prefix": "COMBLLAMA"})
@click.version_option(package_name="combllama")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks for internal errors and library warnings.")
@click.pass_context
def cli(ctx, verbose):
    """Ask questions about books, PDFs and code repositories from a compressed memory on disk.

    \b
      combllama ingest book.md            # encode once → a named memory
      combllama ask book "Who is Ada?"    # answer from the memory
      combllama ask notes.txt "Summary?"  # ingests on the fly, reuses by content hash
    """
    ctx.ensure_object(dict)["verbose"] = verbose
    if not verbose:
        # Libraries announce their API churn (transformers 5.24: "`past_key_values` is deprecated") on
        # stderr, between the user's answer and our one-line messages; that is for us to read, with -v.
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
    from .config import install

    install(ctx)  # config.toml defaults for the command about to run (docs/cli.md "Configuration")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="combllama")
