"""The full reliability run: every harness of tests/reliability at full size, one after the other,
with a report in bench/results/reliability.{json,md}.

    nice -n 10 .venv/bin/python tests/reliability/harness.py            # full run (~40 min on 2 cores)
    .venv/bin/python tests/reliability/harness.py --quick              # a smoke run of the same code

Full sizes: 200 kills of an ingest with the embedded SmolLM2; ENOSPC and EIO at every os.open/write/
fsync/replace call of an ingest and every fsync lost before a power cut (tiny random model); the
corruption corpus of a real SmolLM2 memory (every cut in the first 64 KiB, 1,000 bit flips per file);
60 s of atheris per fuzz target, new coverage merged into fuzz/corpus; the pytest files of the CI
versions (stateful, terminal, resources, fuzz replay) for their counts. CI runs the short versions
(tests/reliability/test_rel_*.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
RESULTS = ROOT / "bench" / "results"


# Bugs the harnesses found while they were built; each fix has its own commit and a regression test.
FOUND_AND_FIXED = [
    "write path: ENOSPC/EIO on os.open/write/fsync/replace (and on opening LOCK) escaped as a raw OSError "
    "(exit 1, 'internal error') -> ResourceError, exit 4, one line, temp file removed (2452bd7; write-fault matrix)",
    "sessions: a full disk (SQLITE_FULL) was SessionDatabaseError, exit 1 -> SessionDiskFullError, exit 4 "
    "(77f5d06; test_rel_write_faults::test_sessions_database_on_a_full_disk[pages])",
    "memory: single bit flips in MANIFEST.json and a shifted positions.logical_length loaded and were served "
    "differently -> manifest_sha256 and logical_length/layout checks (7903516; corruption corpus)",
    "memory: a removal killed between its rename and its rmtree left .NAME.deleting.* forever -> swept by the next "
    "writer (8b51964; test_rel_kill9::test_next_writer_cleans_orphans_and_interrupted_removals)",
    "ingest: zlib.error from a corrupt deflate stream escaped SafeZip.read and sniff(); NotImplementedError for an "
    "unknown zip version escaped SafeZip.open -> SourceError (d542609; atheris epub, fuzz/regressions/epub)",
    "memory format: a safetensors header whose data_offsets/shape hold objects, and a manifest whose "
    "required_features holds objects, raised TypeError -> CorruptMemoryError (atheris st_header and manifest in "
    "the full run; fuzz/regressions/{st_header,manifest}, test_rel_fuzz)",
    "ingest: html.parser (Python 3.11) raised AssertionError on an unknown marked-section keyword (`<![NTITY`), "
    "which escaped the HTML extractor -> such declarations are read as text (atheris html in a CI run; "
    "fuzz/regressions/html, tests/ingest/test_load.py::test_malformed_declarations_are_read_as_text)",
    "info --verify --json exited 0 on a damaged memory (docs/cli.md promises 6) (5b384da; reliability case 2)",
    "memory: a manifest and chunks consistent with each other but not with the model's layers/heads/head_dim, and "
    "out-of-range kvcompose counts/positions and hcattention codes/scales, reached torch -> typed errors before "
    "attach (8ea20c9; cases 8, 9)",
    "model cache and adapter files were renamed into place without fsync; the tokenizer-only cache raised "
    "NameError when first built (c868417; case 16)",
    "pdf: AES without the cryptography package ended in 'no page could be read' -> the install hint (54b15f2; case 21)",
    "safezip: the entry cap was checked after zipfile had built every record (~50 MiB for 100k entries), and a NUL "
    "in a member name let 'c1.xhtml\\0../../evil' pose as a chapter (8b21975; cases 22, 24)",
    "prompt: '<|im_start|>' written in a document became the real control token, so a document could open a chat "
    "turn of its own -> split_special_tokens, <document> framing, look-alike delimiters defused (82540a4; case 29)",
    "chat rendering: Markdown links became OSC 8 hyperlinks hiding their target -> shown as 'text (url)' (ac413a9; "
    "case 29)",
    "memory format: a chunk whose header gives two same-sized tensors the same data_offsets (checksums resealed) "
    "loaded through the zero-copy reader, which took offsets as given: v served k's bytes -> the header check "
    "requires the tensors to tile the data section, as the safetensors format does (f8a5a9e; corruption corpus "
    "'manifest/overlapping-offsets+sha' once the memory's chunk layout let the zero-copy path take it; "
    "test_rel_fuzz::test_tensors_must_tile_the_data_section)",
    "fuzz harness (not the product): the repo target's tree builder crashed on a self-referencing link while "
    "placing entries; fixed in fuzz/targets.py, input kept in fuzz/regressions/repo",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tiny_model(root: Path, embedded) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer (the CI tests' tiny_dir)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = embedded.tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32768,
                         rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    d = root / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def run_kills(work: Path, n: int, model_dir: Path | None) -> dict:
    from killloop import kill_loop

    res = kill_loop(work / "kill", n, ["--model", str(model_dir)] if model_dir else [], lines=60, seed=2026, log=log)
    out = res.to_dict()
    out["model"] = "tiny random 2-layer Llama" if model_dir else "embedded SmolLM2-135M-Instruct"
    return out


def run_faults(work: Path, tiny, doc, quick: bool) -> dict:
    from faults import OPS, Fault
    from writefaults import call_counts, ingest_doc, run_matrix

    from combllama.core.encode import EncodeConfig, ingest
    from combllama.core.memory.store import MemoryStore
    from combllama.core.methods import get_method
    from combllama.sessions.store import SessionStore

    home = work / "faults-home"
    store = MemoryStore(home / "memories")
    ingest(tiny, doc, get_method("full"), store, name="keep", config=EncodeConfig(chunk_tokens=128))
    with SessionStore(home / "data" / "sessions.db") as s:
        s.create("chat", memories=["keep"])
        for i in range(5):
            s.append_turn("chat", f"question {i}", f"answer {i}")
    ingest_doc(tiny, doc, store, "ref")
    reference = [c["sha256"] for c in store.open("ref").manifest["chunks"]]
    store.remove("ref")
    counts = call_counts(tiny, doc, store)
    step = 7 if quick else 1
    faults = [Fault(op, k, action) for op in OPS for action in ("ENOSPC", "EIO")
              for k in range(1, counts[op] + 1, step)]
    faults += [Fault("fsync", k, "lose") for k in range(1, counts["fsync"] + 1, step)]
    log(f"write faults: {len(faults)} injections over calls {counts}")
    t0 = time.perf_counter()
    res = run_matrix(tiny, doc, home, faults, reference).to_dict()
    res.update(calls_per_ingest=counts, planned=len(faults), seconds=round(time.perf_counter() - t0, 1))
    return res


def run_corruption(work: Path, embedded, doc, quick: bool) -> dict:
    from corrupt import run_corpus

    from combllama.core.encode import EncodeConfig, ingest
    from combllama.core.memory.store import MemoryStore
    from combllama.core.methods import get_method

    store = MemoryStore(work / "corpus-home" / "memories")
    ingest(embedded, doc, get_method("full"), store, name="real", config=EncodeConfig(chunk_tokens=128))
    res = run_corpus(store.root / "real", embedded.fingerprint, flips=100 if quick else 1000,
                     random_cuts=20 if quick else 200, head_cuts=1024 if quick else 65536,
                     cut_stride=1 if quick else 8, log=log)
    out = res.to_dict()
    out["params"] = {"flips_per_file": 100 if quick else 1000, "random_cuts_per_file": 20 if quick else 200,
                     "head_bytes": 1024 if quick else 65536, "cut_stride": 1 if quick else 8}
    out["memory"] = {"model": embedded.name, "chunks": len(store.open("real").manifest["chunks"]),
                     "chunk_file_bytes": res.largest_file_bytes}
    return out


def run_fuzz(work: Path, seconds: int, merge: bool) -> dict:
    from fuzzrun import merge_into_corpus, run_target

    sys.path.insert(0, str(ROOT / "fuzz"))
    import targets

    out = {}
    for name in sorted(targets.TARGETS):
        log(f"fuzz {name} for {seconds} s")
        r = run_target(name, seconds, work / "fuzz")
        d = r.to_dict()
        if r.crashes:  # keep them for triage: each becomes a file in fuzz/regressions/<target>/
            keep = ROOT / "fuzz" / "found" / name
            keep.mkdir(parents=True, exist_ok=True)
            for c in r.crashes:
                shutil.copy(c, keep)
            d["tail"] = r.tail[-1500:]
        if merge and not r.crashes:
            d["merged_into_corpus"] = merge_into_corpus(name, work / "fuzz")
        d["corpus_after"] = len(list((ROOT / "fuzz" / "corpus" / name).iterdir()))
        out[name] = d
    return out


def run_pytest(files: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=ROOT,
                          capture_output=True, text=True)
    last = [line for line in proc.stdout.splitlines() if " passed" in line or " failed" in line]
    return {"files": files, "rc": proc.returncode, "summary": last[-1] if last else proc.stdout[-500:],
            "seconds": round(time.perf_counter() - t0, 1)}


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform(), "cuda": torch.cuda.is_available()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run of the full harness)")
    ap.add_argument("--kills", type=int, default=None)
    ap.add_argument("--fuzz-seconds", type=int, default=None)
    ap.add_argument("--kill-model", choices=["embedded", "tiny"], default="embedded",
                    help="model of the kill loop's children (tiny: when the machine is too slow for 200 SmolLM2 runs)")
    ap.add_argument("--only", default="kills,faults,corruption,fuzz,pytest")
    ap.add_argument("--out", type=Path, default=RESULTS / "reliability.json")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON")
    args = ap.parse_args(argv)
    if args.render:
        return render(args.out)
    kills = args.kills or (10 if args.quick else 200)
    fuzz_s = args.fuzz_seconds or (5 if args.quick else 60)
    only = set(args.only.split(","))

    from combllama import ingest as sources
    from combllama.core.model import ModelSpec, load_model

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="combllama-reliability-"))
    report: dict = {"command": "tests/reliability/harness.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine()}
    prior = json.loads(args.out.read_text()) if args.out.exists() else {}

    this_run = {"command": report.pop("command"), "started": report.pop("started"), "sections": []}

    def save() -> None:  # after every section: a run cut short keeps what it measured
        this_run["seconds"] = round(time.time() - started, 1)
        this_run["sections"] = sorted(k for k in report if k not in ("machine", "found_and_fixed"))
        report["found_and_fixed"] = FOUND_AND_FIXED
        runs = [r for r in prior.get("runs", []) if r.get("started") != this_run["started"]]
        if not runs and "command" in prior:  # a report written before runs were recorded
            runs = [{"command": prior["command"], "started": prior.get("started"), "seconds": prior.get("seconds"),
                     "sections": sorted(k for k in prior if k in ("kill9", "write_faults", "corruption", "fuzz",
                                                                   "pytest"))}]
        out = {**{k: v for k, v in prior.items() if k not in ("command", "started", "seconds")}, **report,
               "runs": runs + [this_run]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        args.out.with_suffix(".md").write_text(markdown(out))

    try:
        embedded = load_model(ModelSpec(device="cpu"))
        tiny_dir = tiny_model(work, embedded)
        tiny = load_model(ModelSpec(str(tiny_dir), device="cpu"))
        doc = sources.load(ROOT / "samples" / "lighthouse.md")
        if "kills" in only:
            log(f"kill -9 loop: {kills} kills, model {args.kill_model}")
            report["kill9"] = run_kills(work, kills, tiny_dir if args.kill_model == "tiny" else None)
            save()
        if "faults" in only:
            report["write_faults"] = run_faults(work, tiny, doc, args.quick)
            save()
        if "corruption" in only:
            log("corruption corpus")
            report["corruption"] = run_corruption(work, embedded, doc, args.quick)
            save()
        if "fuzz" in only:
            report["fuzz"] = run_fuzz(work, fuzz_s, merge=not args.quick)
            save()
        if "pytest" in only:
            log("pytest: stateful, terminal, resources, fuzz replay")
            report["pytest"] = {
                "stateful": run_pytest(["tests/reliability/test_rel_stateful.py"]),
                "terminal": run_pytest(["tests/reliability/test_rel_terminal.py"]),
                "resources": run_pytest(["tests/reliability/test_rel_resources.py"]),
                "fuzz_replay": run_pytest(["tests/reliability/test_rel_fuzz.py", "-k", "not atheris"]),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save()
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def render(path: Path) -> None:
    """Rewrite the markdown summary from the JSON (after a change to this file's notes)."""
    r = json.loads(path.read_text())
    r["found_and_fixed"] = FOUND_AND_FIXED
    path.write_text(json.dumps(r, indent=2, sort_keys=True) + "\n")
    path.with_suffix(".md").write_text(markdown(r))


def markdown(r: dict) -> str:
    """The committed summary table (bench/results/reliability.md)."""
    m = r.get("machine", {})
    lines = ["# Reliability harness results", "",
             f"Machine: {m.get('cpus')} CPUs (shared), Python {m.get('python')}, torch {m.get('torch')}, "
             f"CUDA {m.get('cuda')}. Runs:", ""]
    for run in r.get("runs", []):
        lines.append(f"- `nice -n 10 .venv/bin/python {run['command']}` · {run.get('started')} · "
                     f"{(run.get('seconds') or 0) / 60:.0f} min · sections: {', '.join(run.get('sections', []))}")
    lines += ["", "| Harness | Result |", "|---|---|"]
    k = r.get("kill9")
    if k:
        shim = ", ".join(f"{op} {n}" for op, n in k["shim_kills"].items())
        lines.append(f"| kill -9 loop ({k.get('model')}) | **{k['kills']} kills survived** "
                     f"({k['timed_kills']} at random "
                     f"delays; inside calls: {shim}; {k['kills_inside_commit']} inside a manifest commit), "
                     f"{k['completed_runs']} runs finished first; {k['committed_states_checked']} committed states "
                     f"and {k['chunks_verified']:,} chunks verified against the uninterrupted run; "
                     f"{k['orphan_files_seen']} orphan files seen, all cleaned; final --resume identical: "
                     f"{k['final_equal']}; failures: {len(k['failures'])} |")
    w = r.get("write_faults")
    if w:
        by = ", ".join(f"{key} {n}" for key, n in sorted(w["by_op"].items()))
        lines.append(f"| write faults (ENOSPC/EIO at every call of an ingest) | **{w['injected']} faults injected** "
                     f"({by}); every one a ResourceError, other memory and sessions byte-identical, no temp file, "
                     f"completed to the reference: {w['resumed_equal']}; lost fsyncs + power cut: {w['lost_fsyncs']} "
                     f"({w['lost_detected']} detected by a typed error, {w['lost_harmless']} harmless); "
                     f"failures: {len(w['failures'])} |")
    c = r.get("corruption")
    if c:
        errs = ", ".join(f"{e} {n:,}" for e, n in sorted(c["errors"].items(), key=lambda x: -x[1]))
        p = c.get("params", {})
        lines.append(f"| corruption corpus ({c['memory']['model']} memory, {c['memory']['chunks']} chunks; cuts at "
                     f"every {p.get('cut_stride')}th offset of the first {p.get('head_bytes')} bytes + "
                     f"{p.get('random_cuts_per_file')} random, {p.get('flips_per_file')} bit flips per file) | "
                     f"**{c['cases']:,} cases**: {errs}; accepted unchanged {c['accepted_identical']}; untyped "
                     f"{len(c['untyped'])}; served differently {len(c['silent'])}; attach reached after an error "
                     f"{c['attach_reached_on_error']}; pickle ran: {c['pickle_ran']}; peak RSS growth "
                     f"{c['rss_growth_bytes'] / 2**20:.0f} MiB, Python peak per input byte "
                     f"{c['max_peak_per_input_byte']:.1f} |")
    f = r.get("fuzz")
    if f:
        total = sum(t["runs"] for t in f.values())
        crashes = sum(len(t["crashes"]) for t in f.values())
        per = ", ".join(f"{n} {t['runs']:,}" for n, t in sorted(f.items()))
        secs = next(iter(f.values()))["seconds"]
        lines.append(f"| atheris ({len(f)} targets × {secs} s) | **{total:,} executions** "
                     f"({per}); crashes: {crashes}; corpus files now "
                     f"{sum(t['corpus_after'] for t in f.values())} |")
    for name, p in (r.get("pytest") or {}).items():
        lines.append(f"| pytest {name} | {p['summary']} ({p['seconds']} s) |")
    lines += ["", "Crashes found and fixed during development (each a regression test): see "
              "`bench/results/reliability.json` → `found_and_fixed` and the commits it names.", ""]
    for item in r.get("found_and_fixed", []):
        lines.append(f"- {item}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
