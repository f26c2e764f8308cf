"""Drive fuzz/run.py (atheris) for a fixed time budget per target and read back what it did."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"


@dataclass
class FuzzRun:
    target: str
    seconds: int
    runs: int = 0
    coverage: int = 0  # libFuzzer "cov:" edges at the end
    corpus_in: int = 0
    new_inputs: int = 0
    crashes: list = field(default_factory=list)  # crash-*/timeout-*/oom-* artifact paths
    rc: int = 0
    tail: str = ""

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "tail"}


def run_target(target: str, seconds: int, work: Path, timeout_per_input: int = 20, rss_mb: int = 4096) -> FuzzRun:
    seeds = FUZZ / "corpus" / target
    out = work / f"new-{target}"
    art = work / f"artifacts-{target}"
    out.mkdir(parents=True, exist_ok=True)
    art.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(FUZZ / "run.py"), target, f"-max_total_time={seconds}",
           f"-timeout={timeout_per_input}", f"-rss_limit_mb={rss_mb}", f"-artifact_prefix={art}/",
           "-print_final_stats=1",
           str(out), str(seeds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 300)
    log = proc.stdout + proc.stderr
    result = FuzzRun(target, seconds, rc=proc.returncode, tail=log[-3000:])
    m = re.search(r"Done (\d+) runs", log) or re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    result.runs = int(m.group(1)) if m else 0
    covs = re.findall(r"cov: (\d+)", log)
    result.coverage = int(covs[-1]) if covs else 0
    result.corpus_in = len(list(seeds.iterdir())) if seeds.is_dir() else 0
    result.new_inputs = len(list(out.iterdir()))
    result.crashes = sorted(str(p) for p in art.iterdir())
    return result


def merge_into_corpus(target: str, work: Path) -> int:
    """Add to fuzz/corpus/<target> only the new inputs that add coverage (libFuzzer -merge=1)."""
    seeds = FUZZ / "corpus" / target
    before = len(list(seeds.iterdir()))
    # libFuzzer's merge re-executes argv[0] through the shell: run.py's shebang must find this interpreter.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    subprocess.run([sys.executable, str(FUZZ / "run.py"), target, "-merge=1", "-max_len=65536", str(seeds),
                    str(work / f"new-{target}")], capture_output=True, text=True, timeout=1800, env=env)
    return len(list(seeds.iterdir())) - before
