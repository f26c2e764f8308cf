"""Crash-safe file writes: temp file → fsync → rename → fsync directory (PostgreSQL's durable_rename).

Every file combllama persists goes through `write_atomic`. Directory renames of memories (a bundle put
in place, moved aside for removal or replaced by --force) call os.replace elsewhere, each followed by
`fsync_dir` of the parent; a cache directory written whole (the embedded model) goes in by `publish_dir`.
A rename alone is atomic but not durable: without the fsyncs a power cut can leave an empty file.
OS errors leave as ResourceError (disk full, I/O error: exit 4), never as a raw OSError.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from ..errors import ResourceError

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def storage_error(e: OSError, path) -> ResourceError:
    """The one-line typed error for an OS error while writing `path`."""
    if e.errno in _FULL:
        return ResourceError(f"disk full: cannot write {path} ({e.strerror or e}); free some space and run "
                             f"the command again (an interrupted ingest continues with --resume)")
    return ResourceError(f"cannot write {path}: {e.strerror or e} (errno {e.errno}); check the disk "
                         f"and run the command again")


@contextlib.contextmanager
def storage(path):
    """Turn OSErrors raised inside into `storage_error(…, path)`."""
    try:
        yield
    except OSError as e:
        raise storage_error(e, path) from None


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Make `path` hold exactly `data`, or leave it as it was (and no temp file behind) on any error."""
    tmp_dir = tmp_dir or path.parent
    tmp = tmp_dir / f".{path.name}.{os.getpid()}.tmp"
    with storage(path):
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise storage_error(e, path) from None
        raise
    with storage(path):
        fsync_dir(path.parent)


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then every directory, deepest first (links are not followed)."""
    for dirpath, _, filenames in os.walk(directory, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def publish_dir(tmp: Path, target: Path) -> None:
    """Put the fully written directory `tmp` at `target`: its files and directories fsynced, then the rename,
    then the parent fsynced, so a crash or power cut leaves the old state or all of the new one, never a
    directory whose files are empty. An existing `target` is a stale cache being rebuilt: it is removed."""
    with storage(target):
        fsync_tree(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        fsync_dir(target.parent)
