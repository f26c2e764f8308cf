"""The kill -9 loop: a child ingests a document, the parent kills it at a random moment, and after
every kill the memory must open to exactly the last committed manifest, every listed chunk must
verify and equal the uninterrupted run's chunk byte for byte, and the next writer must clean orphans.

Half the kills use a random delay; the other half land on the Nth os.open/write/fsync/replace call
(faults.py), so they fall inside chunk writes and manifest commits, not only between them. The
children are forked from forkserver.py (one import of torch for the whole loop).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAME = "victim"


def ledger_text(lines: int) -> str:
    return "\n".join(f"Entry {i}: the ledger records {i * 37 % 1000} barrels of {['oil', 'salt', 'tea'][i % 3]} "
                     f"shipped to harbour {i % 17} on day {i % 365}." for i in range(lines))


class ForkServer:
    """Client of forkserver.py."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, str(HERE / "forkserver.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
        ready = self._read()
        assert ready.get("ready"), ready

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("fork server died")
        return json.loads(line)

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self, args: list[str], env: dict, out: Path, err: Path, counts: Path | None = None) -> int:
        req = {"run": args, "env": env, "out": str(out), "err": str(err)}
        if counts is not None:
            req["counts"] = str(counts)
        return self._ask(req)["pid"]

    def wait(self, pid: int, timeout: float) -> int | None:
        return self._ask({"wait": pid, "timeout": timeout})["status"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@dataclass
class LoopResult:
    kills: int = 0
    timed_kills: int = 0
    shim_kills: dict = field(default_factory=lambda: {"open": 0, "write": 0, "fsync": 0, "replace": 0})
    kills_inside_commit: int = 0  # killed between a manifest's "intent" and "done" (inside os.replace's window)
    kills_before_first_commit: int = 0
    kills_with_orphans: int = 0  # kills that left tmp files or unlisted chunk files behind
    orphan_files_seen: int = 0
    completed_runs: int = 0  # children that finished before their kill (then re-ingested with --force)
    resumed_runs: int = 0
    committed_states_checked: int = 0
    chunks_verified: int = 0
    final_equal: bool = False
    seconds: float = 0.0
    reference_seconds: float = 0.0
    failures: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _commit_log(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    return [tuple(line.split()) for line in path.read_text().splitlines() if line.strip()]


def _orphans(root: Path, manifest: dict | None) -> list[str]:
    listed = {c["file"] for c in (manifest or {}).get("chunks", []) if c.get("file")}
    out = []
    if (root / "chunks").is_dir():
        out += [f"chunks/{p.name}" for p in (root / "chunks").iterdir() if f"chunks/{p.name}" not in listed]
    if (root / "tmp").is_dir():
        out += [f"tmp/{p.name}" for p in (root / "tmp").iterdir()]
    out += [p.name for p in root.parent.iterdir() if p.name.startswith(f".{NAME}.")]
    return out


def check_state(memories: Path, reference: dict, allowed: set, where: str, result: LoopResult) -> dict | None:
    """The invariant after a kill. Returns the manifest on disk (None when there is none)."""
    from combllama.core.errors import CombllamaError
    from combllama.core.memory.bundle import MemoryReader

    from combllama.core.memory.store import MemoryStore

    root = memories / NAME
    MemoryStore(memories)  # what every command does first: finish a --force swap cut between its renames
    on_disk = _sha(root / "MANIFEST.json")
    if on_disk not in allowed:
        result.failures.append(f"{where}: manifest on disk {str(on_disk)[:12]} is not the last committed state "
                               f"(allowed {[str(a)[:12] for a in allowed]})")
    if on_disk is None:
        return None
    try:
        reader = MemoryReader(root)
        problems = reader.verify()
    except CombllamaError as e:
        result.failures.append(f"{where}: committed memory does not open: {e}")
        return None
    result.committed_states_checked += 1
    if problems:
        result.failures.append(f"{where}: committed chunks fail to verify: {problems[:3]}")
    ref_chunks = reference["chunks"]
    for rec in reader.manifest["chunks"]:
        ref = ref_chunks[rec["seq"]] if rec["seq"] < len(ref_chunks) else None
        if ref is None or (rec["start"], rec["end"], rec["sha256"]) != (ref["start"], ref["end"], ref["sha256"]):
            result.failures.append(f"{where}: chunk {rec['seq']} differs from the uninterrupted run")
        result.chunks_verified += 1
    return reader.manifest


def kill_loop(workdir: Path, n: int, model_args: list[str], *, lines: int = 60, chunk_tokens: int = 64,
              seed: int = 0, env: dict | None = None, log=print) -> LoopResult:
    """Kill an ingest `n` times; see the module docstring for what is checked."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    doc = workdir / "ledger.txt"
    doc.write_text(ledger_text(lines))
    home = workdir / "home"
    memories = home / "memories"
    env = dict(env or os.environ)
    from combllama.core.paths import Paths

    # The children share the caller's model cache: a conversion inside the reference run would skew
    # the timing the random kill delays are drawn from.
    env.setdefault("COMBLLAMA_CACHE_DIR", str(Paths.from_env(env).cache))
    env["COMBLLAMA_HOME"] = str(home)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop("COMBLLAMA_MEMORY_DIR", None)
    base = ["ingest", str(doc), "--device", "cpu", "--chunk-tokens", str(chunk_tokens), "-q", *model_args]
    log_path = workdir / "commits.log"
    child_env = {"COMBLLAMA_TEST_COMMIT_LOG": str(log_path)}
    result = LoopResult()
    server = ForkServer(env)
    t_start = time.perf_counter()
    try:
        # The uninterrupted reference, with the shim counting calls (to aim the shim kills).
        counts = workdir / "counts.json"
        t0 = time.perf_counter()
        pid = server.run([*base, "--name", "reference"], child_env, workdir / "ref.out", workdir / "ref.err", counts)
        status = server.wait(pid, 900)
        result.reference_seconds = time.perf_counter() - t0
        if status != 0:
            raise RuntimeError(f"reference ingest failed ({status}): {(workdir / 'ref.err').read_text()[-2000:]}")
        reference = json.loads((memories / "reference" / "MANIFEST.json").read_text())
        calls = json.loads(counts.read_text())
        log(f"reference: {len(reference['chunks'])} chunks in {result.reference_seconds:.1f} s; calls {calls}")

        for i in range(n):
            root = memories / NAME
            before = _sha(root / "MANIFEST.json")
            state, left = None, 1.0
            if before is not None:
                current = json.loads((root / "MANIFEST.json").read_text())
                state = current["ingest"]["state"]
                if state == "partial":  # aim within what is left of the work, or most children finish
                    left = max(0.1, 1 - len(current["chunks"]) / len(reference["chunks"]))
            flags = ["--resume"] if state == "partial" else ["--force"] if state == "complete" else []
            result.resumed_runs += state == "partial"
            log_path.unlink(missing_ok=True)
            cenv = dict(child_env)
            timed = i % 2 == 0
            if timed:
                delay = rng.uniform(0.0, result.reference_seconds * left * 1.1)
                what = f"after {delay:.2f} s"
            else:
                op = rng.choice(["open", "write", "fsync", "replace"])
                nth = rng.randint(1, max(1, int(calls[op] * left)))
                cenv["COMBLLAMA_TEST_FAULT"] = f"{op}:{nth}:kill"
                what = f"at {op} #{nth}"
            pid = server.run([*base, "--name", NAME, *flags], cenv, workdir / "victim.out", workdir / "victim.err")
            if timed:
                time.sleep(delay)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            status = server.wait(pid, 900)
            where = f"kill {i + 1} ({what}, {' '.join(flags) or 'fresh'})"
            if status is None:
                os.kill(pid, signal.SIGKILL)
                server.wait(pid, 60)
                result.failures.append(f"{where}: the child hung")
                continue
            entries = _commit_log(log_path)
            done = [sha for kind, sha in entries if kind == "done"]
            intents = [sha for kind, sha in entries if kind == "intent"]
            if flags == ["--force"]:
                # --force writes a hidden staging bundle and swaps it in after its seal: until then the old
                # memory is on disk untouched; after the swap, the sealed new one.
                allowed = {before} | ({done[-1]} if done else set())
            else:
                allowed = {done[-1] if done else before}
                if intents and (not done or intents[-1] != done[-1]):
                    allowed.add(intents[-1])  # killed inside the replace: old or new, never a mix
            result.kills_inside_commit += bool(intents and (not done or intents[-1] != done[-1])) and \
                status == -signal.SIGKILL
            if status == -signal.SIGKILL:
                result.kills += 1
                if timed:
                    result.timed_kills += 1
                else:
                    result.shim_kills[op] += 1
                result.kills_before_first_commit += not done
            elif status == 0:
                result.completed_runs += 1
            else:
                result.failures.append(f"{where}: exit {status}: {(workdir / 'victim.err').read_text()[-500:]}")
            manifest = check_state(memories, reference, allowed, where, result)
            if status == 0 and manifest is not None and manifest["ingest"]["state"] != "complete":
                result.failures.append(f"{where}: exit 0 but the memory is not sealed")
            orphans = _orphans(root, manifest) if root.is_dir() else []
            result.kills_with_orphans += bool(orphans)
            result.orphan_files_seen += len(orphans)
            if (i + 1) % 10 == 0:
                log(f"{i + 1}/{n} kills checked; {len(result.failures)} failures")

        # Finish with a clean --resume (or a fresh run) and compare with the uninterrupted run.
        state = None
        if (memories / NAME / "MANIFEST.json").exists():
            state = json.loads((memories / NAME / "MANIFEST.json").read_text())["ingest"]["state"]
        flags = ["--resume"] if state == "partial" else []
        if (memories / f".{NAME}.replacing").exists():  # a killed --force: the next --force clears it
            flags, state = ["--force"], None
        if state != "complete":
            pid = server.run([*base, "--name", NAME, *flags], child_env, workdir / "final.out", workdir / "final.err")
            status = server.wait(pid, 900)
            if status != 0:
                result.failures.append(f"final run: exit {status}: {(workdir / 'final.err').read_text()[-500:]}")
        final = check_state(memories, reference, {_sha(memories / NAME / "MANIFEST.json")}, "final", result)
        ok = final is not None and final["ingest"]["state"] == "complete" and \
            [c["sha256"] for c in final["chunks"]] == [c["sha256"] for c in reference["chunks"]]
        leftover = _orphans(memories / NAME, final)
        if leftover:
            result.failures.append(f"final: orphans leftover after a completed writer: {leftover[:5]}")
        result.final_equal = ok and not leftover
        if not ok:
            result.failures.append("final: the resumed memory differs from the uninterrupted run")
    finally:
        server.close()
        result.seconds = time.perf_counter() - t_start
    return result


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--model", default=None, help="--model for the children (default: the embedded SmolLM2)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(os.environ.get("TMPDIR", "/tmp")) / f"combllama-kill-{os.getpid()}"
    res = kill_loop(workdir, args.kills, ["--model", args.model] if args.model else [])
    print(json.dumps(res.to_dict(), indent=2))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
