"""Reading and writing memory bundles (layout and manifest: see format.py).

MemoryWriter: create or resume a bundle under an exclusive lock, add chunk files, commit the
manifest atomically. MemoryReader: open a bundle read-only, validate cheapest first, and hand out
verified CPU tensors; it never touches a GPU (the caller moves tensors after every check passed).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Iterator

from ..errors import BusyError, CorruptMemoryError, IncompatibleMemoryError, NotAMemoryError
from .durable import fsync_dir, storage, write_atomic
from .format import (CHUNK_FILE, FORMAT, FORMAT_VERSION, MAX_HEADER_BYTES, MAX_MANIFEST_BYTES, parse_manifest,
                     safetensors_header, seal_manifest)

MANIFEST = "MANIFEST.json"
TOKENS = "tokens.safetensors"
_DT = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32", "int16": "I16",
       "int8": "I8", "uint8": "U8"}


def _dtype_code(t) -> str:
    return _DT[str(t.dtype).removeprefix("torch.")]


def _check_file(path: Path, expect_bytes: int, where: str) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise CorruptMemoryError(f"{where}: {path.name} is missing") from None
    if not path.is_file() or path.is_symlink():
        raise CorruptMemoryError(f"{where}: {path.name} is not a regular file")
    if st.st_size != expect_bytes:
        raise CorruptMemoryError(f"{where}: {path.name} is {st.st_size} bytes, manifest says {expect_bytes} (truncated?)")


def _check_tensors(header: dict, expect_tensors: dict, where: str, file: str) -> None:
    found = {k: [v["dtype"], list(v["shape"])] for k, v in header.items() if k != "__metadata__"}
    if found != {k: [v[0], list(v[1])] for k, v in expect_tensors.items()}:
        raise CorruptMemoryError(f"{where}: tensors in {file} differ from the manifest")


_scratch = threading.local()


def _identity(fd: int) -> tuple:
    """What changes whenever a file's contents can have changed: same inode, size, mtime and ctime (which no
    user can set back) mean the same bytes as when it was last hashed. (Timestamps move in clock ticks, so a
    rewrite within milliseconds of the hash could keep them; that needs a writer changing a committed chunk
    file in place, which combllama never does: chunks are new files, renamed in.)"""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _check_streamed(path: Path, expect_bytes: int, expect_sha: str, expect_tensors: dict, where: str,
                    block: int = 8 << 20) -> tuple:
    """The checks of _load_verified but finiteness, streaming the file through one small buffer per thread:
    nothing is kept, so a whole memory can be verified before anything is allocated for it. Returns the
    file's identity (see _identity) for a later read that may then skip the hash."""
    _check_file(path, expect_bytes, where)
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) != block:
        buf = _scratch.buf = bytearray(block)
    view, h, head, got = memoryview(buf), hashlib.sha256(), bytearray(), 0
    keep = 8 + MAX_HEADER_BYTES  # bytes of the file's start to keep: its length prefix, then its header
    with open(path, "rb", buffering=0) as f:
        before = _identity(f.fileno())
        while n := f.readinto(view):
            h.update(view[:n])
            if got == 0 and n >= 8:
                keep = 8 + min(int.from_bytes(view[:8], "little"), MAX_HEADER_BYTES)
            if len(head) < keep:
                head += view[:min(n, keep - len(head))]
            got += n
        if got != expect_bytes or _identity(f.fileno()) != before:
            raise CorruptMemoryError(f"{where}: {path.name} changed while it was read")
    if h.hexdigest() != expect_sha:
        raise CorruptMemoryError(f"{where}: checksum mismatch in {path.name}")
    _check_tensors(safetensors_header(bytes(head), where, expect_bytes), expect_tensors, where, path.name)
    return before


def _load_verified(path: Path, expect_bytes: int, expect_sha: str, expect_tensors: dict, where: str,
                   alloc=None, finite: bool = True, known: tuple | None = None) -> dict:
    """Read a tensor file, check size → sha256 → header → names/dtypes/shapes → finiteness; CPU tensors.

    The file is read once into one buffer and the tensors are views of it (no second copy): loading a
    memory is bound by reading and hashing, not by copies. `alloc(n)` may supply that buffer as a uint8
    CPU tensor of n bytes (e.g. page-locked, so the tensors go to a GPU by DMA at full speed); `finite`
    False leaves the NaN/Inf check to the caller (core/fast/load.py does it on the device). `known`: the
    identity _check_streamed returned when it hashed this file; while the file still has it, the bytes are
    the ones hashed and the hash is not computed again (any change of the file falls back to hashing)."""
    _check_file(path, expect_bytes, where)
    data = bytearray(expect_bytes) if alloc is None else alloc(expect_bytes)
    with open(path, "rb", buffering=0) as f:
        same = known is not None and _identity(f.fileno()) == known
        got = f.readinto(data if alloc is None else data.numpy())
        same = same and _identity(f.fileno()) == known
    if got != expect_bytes:
        raise CorruptMemoryError(f"{where}: {path.name} shrank while it was read")
    raw = data if alloc is None else memoryview(data.numpy())
    if not same and hashlib.sha256(raw).hexdigest() != expect_sha:
        raise CorruptMemoryError(f"{where}: checksum mismatch in {path.name}")
    header = safetensors_header(raw, where)
    _check_tensors(header, expect_tensors, where, path.name)
    tensors = _views(data, header, where, path.name)
    for name, t in tensors.items():
        if finite and t.is_floating_point() and t.numel() and not all_finite(t):
            raise CorruptMemoryError(f"{where}: tensor {name!r} holds NaN or Inf")
    return tensors


_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
                 "I16": "int16", "I8": "int8", "U8": "uint8"}


def _views(data, header: dict, where: str, file: str) -> dict:
    """Tensors of a checked safetensors buffer (a bytearray or a uint8 tensor; safetensors_header validated
    every offset), as views of it; a tensor whose offset is not aligned to its element size goes through
    safetensors (a copy)."""
    import torch

    flat_all = torch.frombuffer(data, dtype=torch.uint8) if isinstance(data, bytearray) else data
    base = 8 + int.from_bytes(flat_all[:8].numpy().tobytes(), "little")
    out, copy = {}, False
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = getattr(torch, _TORCH_DTYPES[spec["dtype"]])
        a, b = spec["data_offsets"]
        if (base + a) % dtype.itemsize:
            copy = True
            break
        out[name] = flat_all[base + a:base + b].view(dtype).view(spec["shape"])
    if not copy:
        return out
    from safetensors.torch import load as st_load

    try:
        return st_load(bytes(data) if isinstance(data, bytearray) else data.numpy().tobytes())
    except Exception as e:  # safetensors raises its own error type; report it as corruption
        raise CorruptMemoryError(f"{where}: {file} does not parse ({e})") from None


def all_finite(t) -> bool:
    """No NaN and no ±Inf in the floating tensor `t`: min and max propagate both, and one aminmax pass
    is an order of magnitude faster on the CPU than isfinite().all() for half types."""
    import torch

    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _tensor_bytes(tensors: dict) -> tuple[bytes, dict]:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return save(tensors), {k: [_dtype_code(v), list(v.shape)] for k, v in tensors.items()}


class MemoryWriter:
    """Exclusive writer of one bundle. Use as a context manager; the lock is released on exit."""

    def __init__(self, root: Path, manifest: dict, lock):
        self.root, self.manifest, self._lock = root, manifest, lock
        self._dirty = False

    # -- opening -------------------------------------------------------------------------------
    @staticmethod
    def _acquire(root: Path, timeout: float):
        from filelock import FileLock, Timeout

        with storage(root):
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = FileLock(str(root / "LOCK"), timeout=timeout)
        with storage(root / "LOCK"):
            try:
                lock.acquire()
            except Timeout:  # filelock's Timeout is a TimeoutError (an OSError): busy, not a disk problem
                raise BusyError(f"{root.name}: another combllama process is writing this memory") from None
        return lock

    @classmethod
    def create(cls, root: Path, header: dict, token_ids: list[int], lock_timeout: float = 10.0) -> "MemoryWriter":
        """Start a new bundle at `root` (which must not hold a manifest yet)."""
        import torch

        lock = cls._acquire(root, lock_timeout)
        try:
            sweep_tombs(root.parent)
            if (root / MANIFEST).exists():
                raise CorruptMemoryError(f"{root.name}: a memory already exists here")
            with storage(root):
                for sub in ("chunks", "tmp"):
                    shutil.rmtree(root / sub, ignore_errors=True)
                    (root / sub).mkdir(mode=0o700)
            data, _ = _tensor_bytes({"ids": torch.tensor(token_ids, dtype=torch.int32)})
            write_atomic(root / TOKENS, data, root / "tmp")
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "min_reader_version": 1, "required_features": [],
                "created_by": f"combllama {_version()}",
                "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                **header,
                "tokens": {"file": TOKENS, "sha256": hashlib.sha256(data).hexdigest(), "count": len(token_ids),
                           "bytes": len(data)},
                "chunks": [], "ingest": {"state": "partial", "next_seq": 0, "planned": header.get("planned_chunks")},
            }
            writer = cls(root, manifest, lock)
            writer.commit()
            return writer
        except BaseException:
            lock.release()
            raise

    @classmethod
    def resume(cls, root: Path, expect: dict, lock_timeout: float = 10.0) -> "MemoryWriter":
        """Reopen a partial bundle. `expect` holds header fields that must match exactly (model,
        method, chunking, source hash...): a resume never mixes old and new settings or content."""
        lock = cls._acquire(root, lock_timeout)
        try:
            manifest = MemoryReader(root).manifest
            for key, value in expect.items():
                if manifest.get(key) != value:
                    raise IncompatibleMemoryError(
                        f"{root.name}: cannot resume: {key} changed since the interrupted ingest "
                        f"(was {manifest.get(key)!r}, now {value!r}); ingest again without --resume")
            writer = cls(root, manifest, lock)
            with storage(root):
                writer.clean_orphans()
                sweep_tombs(root.parent)
            return writer
        except BaseException:
            lock.release()
            raise

    def clean_orphans(self) -> list[str]:
        """Delete staging files and chunk files no committed manifest lists (left by a crash)."""
        listed = {c["file"] for c in self.manifest["chunks"] if c.get("file")}
        removed = []
        shutil.rmtree(self.root / "tmp", ignore_errors=True)
        (self.root / "tmp").mkdir(mode=0o700)
        for p in (self.root / "chunks").iterdir():
            if f"chunks/{p.name}" not in listed:
                p.unlink()
                removed.append(p.name)
        return removed

    # -- writing -------------------------------------------------------------------------------
    @property
    def next_seq(self) -> int:
        return self.manifest["ingest"]["next_seq"]

    def add_chunk(self, start: int, end: int, tokens_sha256: str, source: list, tensors: dict | None) -> dict:
        """Write one chunk's tensors durably; it becomes part of the memory at the next commit()."""
        seq = self.next_seq
        record = {"seq": seq, "start": start, "end": end, "tokens_sha256": tokens_sha256, "source": source,
                  "file": None, "bytes": 0, "sha256": None, "tensors": {}}
        if tensors:
            data, specs = _tensor_bytes(tensors)
            sha = hashlib.sha256(data).hexdigest()
            rel = f"chunks/{seq:06d}-{sha[:12]}.safetensors"
            assert CHUNK_FILE.match(rel)
            write_atomic(self.root / rel, data, self.root / "tmp")
            record.update(file=rel, bytes=len(data), sha256=sha, tensors=specs)
        self.manifest["chunks"].append(record)
        self.manifest["ingest"]["next_seq"] = seq + 1
        self._dirty = True
        return record

    def commit(self, **updates) -> None:
        """Atomically replace MANIFEST.json with the current state (the one commit point)."""
        self.manifest.update(updates)
        data = seal_manifest(self.manifest)
        if len(data) > MAX_MANIFEST_BYTES:
            raise CorruptMemoryError(f"{self.root.name}: manifest would exceed {MAX_MANIFEST_BYTES} bytes")
        write_atomic(self.root / MANIFEST, data, self.root / "tmp")
        self._dirty = False

    def seal(self, **updates) -> None:
        self.manifest["ingest"]["state"] = "complete"
        self.commit(**updates)

    def committed_chunks(self) -> Iterator[tuple[dict, dict]]:
        """(record, verified CPU tensors) of every committed chunk, in order (for resuming)."""
        return MemoryReader(self.root, self.manifest).chunks()

    def close(self) -> None:
        self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MemoryReader:
    """Read-only view of a bundle. Construction validates the manifest (no tensor is read)."""

    def __init__(self, root: Path, manifest: dict | None = None):
        self.root = Path(root)
        self.manifest = manifest if manifest is not None else self._read_manifest()

    def _read_manifest(self) -> dict:
        where = self.root.name or str(self.root)
        if not self.root.is_dir():
            raise NotAMemoryError(f"{self.root}: not a combllama memory (not a memory directory)")
        path = self.root / MANIFEST
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise NotAMemoryError(f"{where}: not a combllama memory (no {MANIFEST})") from None
        if not path.is_file() or path.is_symlink():
            raise NotAMemoryError(f"{where}: {MANIFEST} is not a regular file")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise CorruptMemoryError(f"{where}: manifest is {st.st_size} bytes (cap {MAX_MANIFEST_BYTES})")
        return parse_manifest(path.read_bytes(), where)

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.root.name

    @property
    def complete(self) -> bool:
        return self.manifest["ingest"]["state"] == "complete"

    def check_model(self, fingerprint: str) -> None:
        have = self.manifest["model"]["fingerprint"]
        if have != fingerprint:
            raise IncompatibleMemoryError(
                f"{self.name}: written by another model (memory {have[:18]}…, loaded model {fingerprint[:18]}…); "
                f"load the model it was made with (--model) or ingest again")

    def token_ids(self) -> list[int]:
        t = self.manifest["tokens"]
        tensors = _load_verified(self.root / TOKENS, t.get("bytes", -1), t["sha256"],
                                 {"ids": ["I32", [t["count"]]]}, self.name)
        return tensors["ids"].tolist()

    def chunk(self, record: dict, alloc=None, finite: bool = True, known: tuple | None = None) -> dict:
        """The verified tensors of one chunk (views of one buffer; `alloc`, `finite`, `known`: see
        _load_verified)."""
        if not record.get("file"):
            return {}
        return _load_verified(self.root / record["file"], record["bytes"], record["sha256"], record["tensors"],
                              f"{self.name} chunk {record['seq']}", alloc, finite, known)

    def check_chunk(self, record: dict) -> tuple | None:
        """Verify one chunk file (size, sha256, header, tensor names/dtypes/shapes) streaming, keeping
        nothing: CorruptMemoryError when it fails; else the file's identity, for chunk(known=...).
        Finiteness needs the values: see chunk()."""
        if not record.get("file"):
            return None
        return _check_streamed(self.root / record["file"], record["bytes"], record["sha256"], record["tensors"],
                               f"{self.name} chunk {record['seq']}")

    def block_layout(self, record: dict) -> dict:
        """{tensor name: (file offset of its data, bytes of one slice along its first dim)} of a chunk file,
        from its header (re-validated). For reading a verified file block by block (read_block)."""
        path, where = self.root / record["file"], f"{self.name} chunk {record['seq']}"
        with open(path, "rb", buffering=0) as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            head += f.read(min(n, MAX_HEADER_BYTES))
        header = safetensors_header(head, where, record["bytes"])
        _check_tensors(header, record["tensors"], where, path.name)
        out = {}
        for name, spec in header.items():
            if name != "__metadata__":
                a, b = spec["data_offsets"]
                out[name] = (8 + n + a, (b - a) // max(1, spec["shape"][0] if spec["shape"] else 1))
        return out

    def read_block(self, record: dict, known: tuple, offset: int, out) -> bool:
        """Read len(out) bytes at `offset` of a chunk file into `out` (a uint8 tensor). True only when the
        file's identity is `known` (what check_chunk returned after hashing it) before and after the read,
        so the bytes are the hashed ones; False leaves `out` undefined and the caller reads the chunk again
        with chunk(), which hashes it."""
        view = memoryview(out.numpy())
        with open(self.root / record["file"], "rb", buffering=0) as f:
            if _identity(f.fileno()) != known:
                return False
            got = 0
            while got < len(view) and (n := os.preadv(f.fileno(), [view[got:]], offset + got)):
                got += n
            return got == len(view) and _identity(f.fileno()) == known

    def chunks(self) -> Iterator[tuple[dict, dict]]:
        for record in self.manifest["chunks"]:
            yield record, self.chunk(record)

    def verify(self) -> list[str]:
        """Check every file; return problems (empty when the memory is intact)."""
        problems = []
        try:
            self.token_ids()
        except CorruptMemoryError as e:
            problems.append(str(e))
        for record in self.manifest["chunks"]:
            try:
                self.chunk(record)
            except CorruptMemoryError as e:
                problems.append(str(e))
        return problems

    def stats(self) -> dict:
        m = self.manifest
        files = [self.root / MANIFEST, self.root / TOKENS] + [self.root / c["file"] for c in m["chunks"] if c.get("file")]
        size = sum(p.stat().st_size for p in files if p.exists())
        tensor_bytes = sum(c["bytes"] for c in m["chunks"])
        tokens = m["positions"]["logical_length"]
        return {"name": self.name, "path": str(self.root), "state": m["ingest"]["state"],
                "method": m["method"]["name"], "params": m["method"].get("params", {}),
                "model": m["model"].get("name"), "fingerprint": m["model"]["fingerprint"],
                "source": m["source"].get("name"), "kind": m["source"].get("kind"),
                "tokens": tokens, "document_tokens": m["source"].get("doc_tokens"),
                "chunks": len(m["chunks"]), "bytes": size, "tensor_bytes": tensor_bytes,
                "bytes_per_token": round(size / tokens, 1) if tokens else None,
                "created_at": m.get("created_at"), "kv_dtype": m.get("kv_dtype")}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("combllama")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_tombs(parent: Path) -> list[str]:
    """Delete bundles whose removal was cut short (`.NAME.deleting.PID.TIME` of a process that is gone):
    remove_bundle renames before it deletes, so a kill in between leaves the renamed directory."""
    swept = []
    for p in parent.glob(".*.deleting.*"):
        try:
            pid = int(p.name.rsplit(".", 2)[-2])
        except ValueError:
            continue
        if pid != os.getpid() and _alive(pid):
            continue  # still being deleted by its owner
        shutil.rmtree(p, ignore_errors=True)
        swept.append(p.name)
    return swept


def remove_bundle(root: Path, lock_timeout: float = 10.0) -> None:
    """Delete a bundle (under its lock, so an ingest in progress is never pulled from under it)."""
    lock = MemoryWriter._acquire(root, lock_timeout)
    try:
        tomb = root.with_name(f".{root.name}.deleting.{os.getpid()}.{int(time.time())}")
        with storage(root):
            os.replace(root, tomb)
            fsync_dir(root.parent)
    finally:
        lock.release()
    shutil.rmtree(tomb, ignore_errors=True)


def replace_bundle(new: Path, root: Path, lock_timeout: float = 10.0) -> None:
    """Put the sealed bundle `new` in place of `root` (under root's lock): two renames, so a reader sees
    the old memory or the new one, and a crash between them leaves both on disk under hidden names."""
    lock = MemoryWriter._acquire(root, lock_timeout)
    tomb = root.with_name(f".{root.name}.deleting.{os.getpid()}.{int(time.time())}")
    try:
        with storage(root):
            os.replace(root, tomb)
            try:
                os.replace(new, root)
            except FileNotFoundError:
                if not root.is_dir():  # else another process rolled it forward (MemoryStore.finish_replacements)
                    raise
            fsync_dir(root.parent)
    finally:
        lock.release()
    shutil.rmtree(tomb, ignore_errors=True)
