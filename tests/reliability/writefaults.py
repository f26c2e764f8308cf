"""The write-path fault matrix: ENOSPC and EIO on the Nth os.open/write/fsync/replace of an ingest,
and a lost fsync followed by a simulated power cut (faults.py's Shim, in process).

After every injected error: the ingest raised a typed ResourceError ("disk full" for ENOSPC), the
other memory and the sessions database are byte-identical, no temp file is left, and the memory
being written is either absent or at a committed state that verifies; `--resume` then completes it
to the same tensors as an uninterrupted run. After a lost fsync and a power cut, the damage is
reported by typed errors (never wrong tensors served silently).
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from faults import Fault, Shim


def snapshot(root: Path) -> dict[str, str]:
    """relative path → sha256 of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def temp_files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and
            (p.name.endswith(".tmp") or p.parent.name == "tmp" or ".deleting." in str(p))]


@dataclass
class MatrixResult:
    injected: int = 0
    by_op: dict = field(default_factory=dict)  # "write:ENOSPC" → count
    not_reached: int = 0  # nth beyond the calls this ingest made (counted, not injected)
    resumed_equal: int = 0
    lost_fsyncs: int = 0
    lost_detected: int = 0  # power cut damaged a listed file and a typed error said so
    lost_harmless: int = 0  # the lost data was not needed (an orphan or a superseded file)
    errors_seen: dict = field(default_factory=dict)  # error class → count
    failures: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


CHUNK_TOKENS = 128


def ingest_doc(loaded, doc, store, name, resume=False):
    from combllama.core.encode import EncodeConfig, ingest
    from combllama.core.methods import get_method

    return ingest(loaded, doc, get_method("full"), store, name=name, config=EncodeConfig(chunk_tokens=CHUNK_TOKENS),
                  resume=resume)


def call_counts(loaded, doc, store) -> dict:
    with Shim(None) as shim:
        ingest_doc(loaded, doc, store, "counting")
    store.remove("counting")
    return dict(shim.counts)


def run_matrix(loaded, doc, home: Path, faults: list[Fault], reference: list[str]) -> MatrixResult:
    """Inject each fault into a fresh ingest of `doc` into memory "new" under `home`/memories, next to
    a sealed memory "keep" and a sessions database (`home` must hold both already)."""
    from combllama.core.errors import CombllamaError, ResourceError
    from combllama.core.memory.store import MemoryStore
    from combllama.sessions.store import SessionStore

    memories = home / "memories"
    store = MemoryStore(memories)
    keep = snapshot(memories / "keep")
    sessions_db = home / "data" / "sessions.db"
    with SessionStore(sessions_db) as s:
        turns_before = [(t.question, t.answer) for t in s.turns("chat")]
    result = MatrixResult()
    for fault in faults:
        where = str(fault)
        if (memories / "new").exists():
            shutil.rmtree(memories / "new")
        error = None
        with Shim(fault) as shim:
            try:
                ingest_doc(loaded, doc, store, "new")
            except CombllamaError as e:
                error = e
            except Exception as e:  # noqa: BLE001 - an untyped error is exactly what this harness hunts
                result.failures.append(f"{where}: untyped {type(e).__name__}: {e}")
                continue
        if not shim.fired:
            result.not_reached += 1
            continue
        if fault.action == "lose":
            result.lost_fsyncs += 1
            _check_power_cut(store, shim, where, reference, result)
            continue
        result.injected += 1
        key = f"{fault.op}:{fault.action}"
        result.by_op[key] = result.by_op.get(key, 0) + 1
        result.errors_seen[type(error).__name__] = result.errors_seen.get(type(error).__name__, 0) + 1
        if not isinstance(error, ResourceError):
            result.failures.append(f"{where}: expected ResourceError, got {type(error).__name__}: {error}")
        elif fault.action == "ENOSPC" and "disk full" not in str(error):
            result.failures.append(f"{where}: ENOSPC reported without 'disk full': {error}")
        elif "\n" in str(error):
            result.failures.append(f"{where}: message is not one line")
        if snapshot(memories / "keep") != keep:
            result.failures.append(f"{where}: the other memory changed")
        left = temp_files(memories)
        if left:
            result.failures.append(f"{where}: temp files left: {left}")
        with SessionStore(sessions_db) as s:
            if [(t.question, t.answer) for t in s.turns("chat")] != turns_before:
                result.failures.append(f"{where}: sessions changed")
        if (memories / "new" / "MANIFEST.json").exists():
            try:
                problems = store.open("new").verify()
            except CombllamaError as e:
                problems = [str(e)]
            if problems:
                result.failures.append(f"{where}: committed state does not verify: {problems[:2]}")
                continue
            try:
                ingest_doc(loaded, doc, store, "new", resume=True)
            except CombllamaError as e:
                result.failures.append(f"{where}: resume failed: {e}")
                continue
        else:
            ingest_doc(loaded, doc, store, "new")
        got = [c["sha256"] for c in store.open("new").manifest["chunks"]]
        if got == reference:
            result.resumed_equal += 1
        else:
            result.failures.append(f"{where}: the memory completed after the fault differs from the reference")
    return result


def _check_power_cut(store, shim: Shim, where: str, reference: list[str], result: MatrixResult) -> None:
    """After a lost fsync the ingest "succeeded"; a power cut empties the unsynced file. Every read
    must then either serve the reference tensors or raise a typed error naming the damage."""
    from combllama.core.errors import CombllamaError

    damaged = shim.power_cut()
    try:
        reader = store.open("new")
        problems = reader.verify()
        shas = [c["sha256"] for c in reader.manifest["chunks"]]
    except CombllamaError as e:
        result.errors_seen[type(e).__name__] = result.errors_seen.get(type(e).__name__, 0) + 1
        result.lost_detected += 1
        return
    except Exception as e:  # noqa: BLE001
        result.failures.append(f"{where}: untyped {type(e).__name__} after a power cut: {e}")
        return
    if problems:
        result.lost_detected += 1
    elif shas == reference:
        result.lost_harmless += 1  # the emptied file was an orphan or already replaced
    else:
        result.failures.append(f"{where}: after a power cut the memory differs silently ({damaged})")
