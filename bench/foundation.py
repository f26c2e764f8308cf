"""Foundation benchmark: model load, ingest speed, bytes/token and time to first answer token from a
memory versus re-reading the document with plain transformers — same machine, same run.

    python -m combllama.bench.foundation --out bench/results/foundation-cpu

Runs the model loads in fresh subprocesses (a first load converts the GGUF into an empty cache;
a later load reads the cached safetensors) and everything else in-process.
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

LOAD_SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # transformers imports lazily
from combllama.core.model import ModelSpec, load_model
t1 = time.perf_counter()
m = load_model(ModelSpec(device=sys.argv[1]))
print(json.dumps({"imports_s": t1 - t0, "load_s": m.load_seconds, "process_s": time.perf_counter() - t0}))
"""


def load_times(cache: Path, device: str) -> dict:
    env = dict(os.environ, COMBLLAMA_CACHE_DIR=str(cache), COMBLLAMA_HOME=str(cache / "home"))
    out = {}
    for label in ("first", "later", "later_2"):
        r = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, device], env=env, capture_output=True, text=True,
                           check=True)
        out[label] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def document_text(min_chars: int) -> str:
    """Real prose and code that every Python installation has: the standard library's own sources."""
    import argparse as _a

    text = Path(_a.__file__).read_text()
    return text[:min_chars]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/foundation-cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--doc-chars", type=int, default=22000, help="document size (fits SmolLM2's 8K window)")
    ap.add_argument("--chunk-tokens", type=int, default=512)
    args = ap.parse_args(argv)

    import torch

    from combllama import ingest as sources
    from combllama.core.encode import EncodeConfig, ingest
    from combllama.core.engine import Engine, GenerateOptions
    from combllama.core.memory.store import MemoryStore
    from combllama.core.methods import from_manifest, get_method
    from combllama.core.model import ModelSpec, load_model
    from combllama.core.prompt import memory_prefix_ids, turn_ids

    tmp = Path(tempfile.mkdtemp(prefix="combllama-bench-"))
    loads = load_times(tmp / "cache", args.device)
    os.environ["COMBLLAMA_CACHE_DIR"] = str(tmp / "cache")
    loaded = load_model(ModelSpec(device=args.device))
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)

    doc_path = tmp / "argparse_excerpt.txt"
    doc_path.write_text(document_text(args.doc_chars))
    document = sources.load(doc_path)
    store = MemoryStore(tmp / "memories")
    t = time.perf_counter()
    result = ingest(loaded, document, get_method("full"), store, name="doc",
                    config=EncodeConfig(chunk_tokens=args.chunk_tokens))
    sync()
    ingest_s = time.perf_counter() - t
    stats = result.stats
    question = "What does the ArgumentParser class do?"
    q_ids = turn_ids(loaded.tokenizer, question)

    def ttft_memory() -> float:
        t0 = time.perf_counter()
        reader = store.open("doc")
        reader.check_model(loaded.fingerprint)
        memory = from_manifest(reader.manifest).attach(loaded.model, reader.manifest, reader.chunks())
        engine = Engine(loaded.model, memory, loaded.eos_ids)
        gen = engine.generate(q_ids, GenerateOptions(max_new_tokens=1))
        next(gen, None)
        sync()
        gen.close()
        return time.perf_counter() - t0

    def ttft_reread() -> float:
        """Plain transformers: tokenize the document and prefill it with the question, take a token."""
        t0 = time.perf_counter()
        doc_ids = loaded.tokenizer(document.joined(), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([memory_prefix_ids(loaded.tokenizer) + doc_ids + q_ids], device=loaded.device)
        with torch.inference_mode():
            loaded.model(ids, logits_to_keep=1).logits[0, -1].argmax()
        sync()
        return time.perf_counter() - t0

    ttft_memory(), ttft_reread()  # warm-up (allocator, page cache)
    mem_runs = sorted(ttft_memory() for _ in range(3))
    reread_runs = sorted(ttft_reread() for _ in range(3))
    record = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu",
                    "threads": torch.get_num_threads()},
        "model": loaded.name, "dtype": str(loaded.dtype), "date": time.strftime("%Y-%m-%d"),
        "command": "python -m combllama.bench.foundation " + " ".join(argv or sys.argv[1:]),
        "load": loads,
        "ingest": {"memory_tokens": stats["tokens"], "chunks": stats["chunks"], "seconds": round(ingest_s, 3),
                   "tokens_per_s": round(stats["tokens"] / ingest_s, 1), "bytes": stats["bytes"],
                   "bytes_per_token": stats["bytes_per_token"]},
        "ttft": {"from_memory_s": round(mem_runs[1], 4), "reread_plain_transformers_s": round(reread_runs[1], 4),
                 "speedup": round(reread_runs[1] / mem_runs[1], 2), "runs_memory": mem_runs, "runs_reread": reread_runs},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    ld = loads
    md = f"""| measure ({record['machine']['device']}, {record['machine']['cpu_count']} cores, {loaded.name} {record['dtype']}) | value |
|---|---|
| first model load (GGUF → cached safetensors), in process | {ld['first']['load_s']:.1f} s |
| later model load, in process (after importing torch and transformers' Auto/Llama classes) | {ld['later']['load_s']:.2f} s / {ld['later_2']['load_s']:.2f} s |
| later load, whole fresh process incl. imports | {ld['later']['process_s']:.2f} s |
| ingest (`full`, {stats['tokens']:,} tokens, {stats['chunks']} chunks) | {record['ingest']['tokens_per_s']:,.0f} tokens/s |
| bytes per token of the `full` memory on disk | {stats['bytes_per_token']:,.0f} B |
| time to first answer token from the memory (open, verify, attach, prefill question) | {mem_runs[1]:.3f} s |
| time to first answer token re-reading the document (plain transformers) | {reread_runs[1]:.3f} s |
"""
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
