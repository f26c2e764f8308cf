"""`combllama count` over the standard library folder of the running interpreter (issue 3, "Must show").

Runs the installed command as a user would (a fresh process, default embedded tokenizer, no weights)
after one warm-up count that fills the tokenizer cache, and writes bench/results/count_stdlib.json
and .md. Usage: python bench/count_stdlib.py [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def command() -> list[str]:
    script = Path(sys.executable).parent / "combllama"
    return [str(script)] if script.is_file() else [sys.executable, "-c",
                                                    "from combllama.cli.main import main; main()"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    stdlib = os.path.dirname(os.__file__)
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "COMBLLAMA_HOME": home}
        warm = Path(home) / "warm.txt"
        warm.write_text("warm-up\n")
        subprocess.run(command() + ["count", str(warm), "-q", "--json"], env=env, check=True, capture_output=True)
        t0 = time.perf_counter()
        proc = subprocess.run(command() + ["count", stdlib, "--json", "-q", "--top", "10"], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"combllama count failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout)
    doc = out["documents"][0]
    site = [f for f in doc["per_file"] if f["path"].startswith("site-packages/")]
    result = {
        "command": f"combllama count {stdlib} --json",
        "stdlib": stdlib,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "model": out["model"],
        "wall_seconds": round(wall, 2),
        "seconds": out["seconds"],
        "files": doc["files"],
        "tokens": doc["tokens"],
        "chars": doc["chars"],
        "skipped": len(doc["skipped"]),
        "skip_summary": doc["skip_summary"],
        "warnings": len(doc["warnings"]),
        "site_packages": {"files": len(site), "tokens": sum(f["tokens"] for f in site)},
        "largest": doc["largest"],
        "estimates": doc["estimates"],
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "count_stdlib.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "count_stdlib.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    skips = ", ".join(f"{k} {v:,}" for k, v in r["skip_summary"].items())
    sp = r["site_packages"]
    est = "; ".join(f"{e['method']}: " + (f"{e['memory_tokens']:,} tokens, {e['bytes'] / 2**30:,.2f} GiB"
                                          if e["fits"] else "does not fit the window")
                    for e in r["estimates"])
    return f"""# `combllama count` over the standard library folder

Command: `{r['command']}` (run by `python bench/count_stdlib.py`; tokenizer cache warm, no weights loaded)
Machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs, Python {r['machine']['python']}
Tokenizer: {r['model']['name']} (KV {r['model']['kv_dtype']}, {r['model']['kv_bytes_per_token']:,} B/token)

| files read | tokens | characters | skipped | wall time |
|---:|---:|---:|---:|---:|
| {r['files']:,} | {r['tokens']:,} | {r['chars']:,} | {r['skipped']:,} | {r['wall_seconds']:.1f} s |

- Time split: tokenizer load {r['seconds']['tokenizer_load']:.1f} s, reading {r['seconds']['read']:.1f} s,
  tokenizing {r['seconds']['tokenize']:.1f} s (the rest is process start and JSON).
- Skips by reason: {skips}.
- This interpreter's folder also holds `site-packages/` ({sp['files']:,} of the files, {sp['tokens']:,} of the
  tokens); the standard library proper is the rest.
- Memory estimate for the whole folder as one memory: {est}.
"""


if __name__ == "__main__":
    main()
