"""Errors raised by sources. `ingest` is a leaf (it may not import core), so it has its own types;
the CLI maps them to exit codes next to core's."""
from __future__ import annotations


class IngestError(Exception):
    """Base of ingest failures; exit code 3 (input unusable)."""

    exit_code = 3


class SourceError(IngestError):
    """A document could not be read or yielded no usable text."""


class UnsupportedSourceError(IngestError):
    """No registered source reads this path."""
