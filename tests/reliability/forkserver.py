"""A fork server for the kill -9 loop: imports torch, transformers and the CLI once, then forks one
fresh child per request that runs `combllama ARGS` (with the fault shim of faults.py installed from
its environment). Importing torch costs seconds per process on a loaded 2-core machine; forking
costs milliseconds, so hundreds of kills fit a CI budget. No tensor op runs before a fork (OpenMP
thread pools do not survive fork); each child builds its own.

Protocol (one JSON object per line on stdin, one line back on stdout):
  {"run": [args...], "env": {...}, "out": path, "err": path, "counts": path?}  →  {"pid": N}
      (with "counts", a child that exits normally writes its shim's call counts there)
  {"wait": N, "timeout": seconds}                              →  {"status": S}  (S < 0: killed by signal -S;
                                                                   null: still running after timeout)
"""
from __future__ import annotations

import json
import os
import sys
import time


def _preload() -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import combllama.cli.ingest_cmd  # noqa: F401
    import combllama.core.encode  # noqa: F401
    import combllama.core.model  # noqa: F401
    from combllama.cli.main import cli  # noqa: F401


def _child(request: dict) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        os.environ.update(request.get("env") or {})
        devnull = os.open(os.devnull, os.O_RDONLY)  # the server's stdin carries requests: never the child's
        os.dup2(devnull, 0)
        os.close(devnull)
        for fd, key in ((1, "out"), (2, "err")):
            target = os.open(request[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import faults

        shim = faults.install_from_env()
        from combllama.cli.main import main

        try:
            main(request["run"])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if shim is not None and request.get("counts"):
            with open(request["counts"], "w") as f:
                json.dump(shim.counts, f)
    except BaseException as e:  # noqa: BLE001 - report anything, then leave without running parent cleanup
        try:
            os.write(2, f"forkserver child: {type(e).__name__}: {e}\n".encode())
        except OSError:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def main() -> None:
    _preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "run" in request:
            pid = os.fork()
            if pid == 0:
                _child(request)
            reply = {"pid": pid}
        else:
            reply = {"status": _wait(int(request["wait"]), float(request.get("timeout", 600)))}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
