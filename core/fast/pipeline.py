"""Ingest that writes chunk i while chunk i+1 computes: a MemoryWriter behind a background thread.

`add_chunk` copies the chunk's device tensors into pinned host buffers (asynchronously, ordered after
the compute that made them) and returns; the thread waits for the copy, then serialises, hashes and
writes the file and commits the manifest, in the order the calls were made. Durability and
resumability are MemoryWriter's, unchanged: a commit still lists only chunks already on disk.
"""
from __future__ import annotations

import queue
import threading


class PipelinedWriter:
    """Same interface as MemoryWriter as ingest uses it (next_seq, add_chunk, commit, seal, manifest,
    committed_chunks, context manager). `depth` bounds the chunks waiting in pinned memory."""

    def __init__(self, writer, depth: int = 3):
        self.writer = writer
        self._next = writer.next_seq
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="combllama-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    kind, args, kwargs, event = item
                    if event is not None:
                        event.synchronize()
                    getattr(self.writer, kind)(*args, **kwargs)
            except BaseException as e:  # surfaced in the ingest thread at its next call
                self._error = e
            finally:
                self._q.task_done()

    def _check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _put(self, kind: str, args=(), kwargs=None, event=None) -> None:
        self._check()
        self._q.put((kind, args, kwargs or {}, event))

    def drain(self) -> None:
        """Wait until every queued write and commit is done (and raise what failed)."""
        self._q.join()
        self._check()

    @property
    def next_seq(self) -> int:
        return self._next

    @property
    def manifest(self) -> dict:
        self.drain()
        return self.writer.manifest

    def committed_chunks(self):
        self.drain()
        return self.writer.committed_chunks()

    def add_chunk(self, start: int, end: int, tokens_sha256: str, source: list, tensors: dict | None) -> None:
        import torch

        event, host = None, tensors
        if tensors and any(t.is_cuda for t in tensors.values()):
            host = {}
            for k, t in tensors.items():
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                buf.copy_(t, non_blocking=True)  # after the kernels that produced t, on their stream
                host[k] = buf
            event = torch.cuda.Event()
            event.record()
        self._put("add_chunk", (start, end, tokens_sha256, source, host), event=event)
        self._next += 1

    def commit(self, **updates) -> None:
        self._put("commit", kwargs=updates)

    def seal(self, **updates) -> None:
        self._put("seal", kwargs=updates)
        self.drain()

    def close(self) -> None:
        try:
            self._q.join()  # what was queued before an error or Ctrl-C still reaches the disk
        finally:
            self._q.put(None)
            self._thread.join()
            self.writer.close()
        self._check()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pipelined(writer, device) -> "PipelinedWriter | object":
    """The writer ingest should use on `device`: pipelined on CUDA (where compute and disk can
    overlap), the writer itself elsewhere (CPU compute and the writes share the same cores)."""
    return PipelinedWriter(writer) if getattr(device, "type", device) == "cuda" else writer
