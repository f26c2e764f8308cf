"""Typed errors of combllama. The CLI turns each into a one-line message and its exit code.

Exit codes are part of the public interface (README "Exit codes"); never renumber one.
No torch here: every layer may import this module.
"""
from __future__ import annotations


class CombllamaError(Exception):
    """Base of every error a user can cause or fix. `exit_code` is what the CLI exits with."""

    exit_code = 1


class BadInputError(CombllamaError):
    """The input cannot be used: unreadable file, no text, unknown option value."""

    exit_code = 3


class ResourceError(CombllamaError):
    """A resource limit: no CUDA device when one was asked for, out of memory, disk full."""

    exit_code = 4


class IncompatibleMemoryError(CombllamaError):
    """The memory was written by another model (fingerprint mismatch) or with other settings."""

    exit_code = 5


class CorruptMemoryError(CombllamaError):
    """The memory is damaged: truncated file, checksum mismatch, inconsistent manifest, NaN/Inf."""

    exit_code = 6


class UnsupportedVersionError(CombllamaError):
    """The memory was written by a newer combllama (format version or required feature unknown)."""

    exit_code = 7


class NotAMemoryError(CombllamaError):
    """The path is not a combllama memory at all (a pickle, a text file, an empty directory)."""

    exit_code = 8


class MemoryNotFoundError(BadInputError):
    """No memory of that name exists."""


class UnknownMethodError(BadInputError):
    """No method of that name is registered."""


class BusyError(CombllamaError):
    """Another process holds the lock (a memory being written, a session being appended)."""

    exit_code = 75


class InterruptedError_(CombllamaError):
    """The user interrupted long work; what was committed is kept and can be resumed."""

    exit_code = 130
