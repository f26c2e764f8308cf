"""The harness side of the kvpress peer: write inputs as JSON, run run_kvpress.py with .venv-kvpress's
python (its own transformers), read the rows back in the harness's row format (method "kvpress:NAME")."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from ...core.errors import BadInputError

PREFIX = "kvpress:"
ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).resolve().parent / "run_kvpress.py"


def python_path() -> Path:
    return Path(os.environ.get("COMBLLAMA_KVPRESS_PYTHON") or ROOT / ".venv-kvpress" / "bin" / "python")


def run(prepared: list, presses: list[str], fractions: list[float], model_dir: Path, eos_ids: list[int],
        log=None, device: str = "cpu", dtype: str = "float32") -> tuple[dict, list[dict]]:
    """(versions, rows) for every case that fits the window, press and fraction (ratio = 1 − fraction),
    with the model on the harness's own device and dtype."""
    py = python_path()
    if not py.is_file():
        raise BadInputError(f"{py} not found: run `bash evals/peers/setup_kvpress.sh` (or set COMBLLAMA_KVPRESS_PYTHON)")
    cases = [{"id": p.case.id, "context_ids": p.memory_ids,
              "continuation_ids": p.continuation_ids if p.case.task == "fidelity" else [],
              "question_ids": p.question_ids, "max_new_tokens": p.case.max_new_tokens}
             for p in prepared if p.fits]
    by_id = {p.case.id: p.case for p in prepared}
    with tempfile.TemporaryDirectory(prefix="combllama-kvpress-") as tmp:
        inp, outp = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps({"model_dir": str(model_dir), "eos_ids": eos_ids, "cases": cases,
                                   "presses": presses, "ratios": [round(1 - f, 6) for f in fractions],
                                   "threads": os.cpu_count(), "device": device, "dtype": dtype}))
        tail: list[str] = []
        # Progress is logged as it comes (a run cut by a time limit still shows how far it got), and the
        # runner dies with the harness instead of running on alone.
        with subprocess.Popen([str(py), str(RUNNER), str(inp), str(outp)], stderr=subprocess.PIPE, text=True) as proc:
            try:
                for line in proc.stderr:
                    tail = (tail + [line])[-200:]
                    if log and line.startswith("kvpress:"):
                        log(line.rstrip())
            except BaseException:
                proc.kill()
                raise
        if proc.returncode != 0:
            raise RuntimeError(f"kvpress runner failed ({proc.returncode}):\n{''.join(tail)[-4000:]}")
        out = json.loads(outp.read_text())
    rows = []
    for r in out["rows"]:
        if r["press"] == "none":
            continue
        case = by_id[r["case"]]
        row = {"method": PREFIX + r["press"], "budget": round(1 - r["ratio"], 6), "case": r["case"], "task": case.task,
               "meta": case.meta, "status": r["status"], "seconds": r.get("seconds")}
        if r["status"] != "ok":
            row["reason"] = r.get("error")
            rows.append(row)
            continue
        row.update(kv_entries=r["kv_entries"], full_kv_entries=r["full_kv_entries"],
                   memory_fraction=r["kv_entries"] / r["full_kv_entries"])
        for flag in ("press_inactive", "stepwise"):
            if r.get(flag):
                row[flag] = True
        if "fidelity" in r:
            row["fidelity"] = r["fidelity"]
        if "answer_ids" in r:
            row["answer_ids"] = r["answer_ids"]
        rows.append(row)
    return out["meta"], rows
