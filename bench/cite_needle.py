"""Citation accuracy on a needle task: one fact planted in one chunk of a long text, the question asks
for it. Among the answers that contain the fact, how often is the planted chunk the first source?

The path measured is the product's: ingest (method full) → memory on disk → attach → answer →
core.chat.Conversation.cite, exactly what `ask` and `chat` print as `Sources:`.

    python -m combllama.bench.cite_needle --cases 20 --out bench/results/cite_needle.json
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TOWNS = ["Aldbury", "Brenmoor", "Calder", "Dunwick", "Elmstead", "Farrow", "Glenhaven", "Harlow", "Ivybridge",
         "Juniper", "Kestrel", "Lowmoor", "Marsh End", "Northam", "Oakridge", "Pellford", "Quarry Hill", "Ravenscar",
         "Stowe", "Thornby"]
PLACES = ["bakery", "bridge", "mill", "school", "chapel", "harbour", "library", "market", "orchard", "tannery"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
COLOURS = ["green", "white", "red", "yellow"]
PEOPLE = ["Mira Holt", "Oskar Venn", "Lena Quist", "Tobias Marr", "Greta Lund", "Felix Arden", "Nora Castell",
          "Ivo Brandt", "Selma Roy", "Hugo Field", "Anya Pell", "Bruno Kade", "Clara Wynn", "Dario Sett",
          "Elsa Thorn", "Fabian Lowe", "Hanna Brook", "Jonas Reed", "Karla Moss", "Leo Hartman"]


@dataclass(frozen=True)
class Case:
    person: str
    number: int
    depth: float  # where the needle line sits, as a fraction of the text
    text: str
    needle_line: int  # 1-based line of the needle in `text`

    @property
    def question(self) -> str:
        return f"What is the secret number of {self.person}?"


def haystack(rng: random.Random, n_lines: int) -> list[str]:
    """Varied, plausible filler lines about towns (no secret numbers in them)."""
    out = []
    for _ in range(n_lines):
        t, p = rng.choice(TOWNS), rng.choice(PLACES)
        out.append(rng.choice([
            f"The {p} in {t} was rebuilt after the flood and now opens every {rng.choice(DAYS)}.",
            f"Travellers from {t} often stop at the old {p} to rest their horses.",
            f"In {t}, the {p} is painted {rng.choice(COLOURS)} and has a slate roof.",
            f"The people of {t} say their {p} is older than the castle on the hill.",
        ]))
    return out


def make_cases(n: int, seed: int = 0, n_lines: int = 110) -> list[Case]:
    """n cases, needles spread evenly over the depth of one ~1,500-token haystack."""
    rng = random.Random(seed)
    lines = haystack(rng, n_lines)
    cases = []
    for i in range(n):
        person, number = PEOPLE[i % len(PEOPLE)], rng.randint(1000, 9999)
        depth = (i + 0.5) / n
        at = int(depth * len(lines))
        text = "\n".join(lines[:at] + [f"The secret number of {person} is {number}."] + lines[at:])
        cases.append(Case(person, number, depth, text, at + 1))
    return cases


def run(loaded, cases: list[Case], root: Path, chunk_tokens: int = 128, max_tokens: int = 24, cite_options=None,
        on_case=None) -> dict:
    """Measure every case; returns the results document (see main)."""
    from ..core.chat import Conversation, combine
    from ..core.cite import CiteOptions
    from ..core.encode import EncodeConfig, ingest
    from ..core.engine import GenerateOptions
    from ..core.memory.store import MemoryStore
    from ..core.methods import from_manifest, get_method
    from ..ingest import Document, Origin, Section
    from ..ingest.document import sha256_text

    options = cite_options or CiteOptions()
    store = MemoryStore(root)
    rows = []
    t0 = time.perf_counter()
    for i, case in enumerate(cases):
        doc = Document(f"needle-{i}.txt", "text", [Section(case.text, Origin(f"needle-{i}.txt", 1))],
                       sha256_text(case.text))
        ingest(loaded, doc, get_method("full"), store, name=f"needle-{i}",
               config=EncodeConfig(chunk_tokens=chunk_tokens))
        reader = store.open(f"needle-{i}")
        memory = from_manifest(reader.manifest).attach(loaded.model, reader.manifest, reader.chunks())
        conv = Conversation(loaded, combine(loaded, [(reader.name, reader.manifest, memory)]))
        prompt = conv.prompt(case.question)
        answer_ids = list(conv.generate(prompt.ids, GenerateOptions(max_tokens)))
        answer = loaded.tokenizer.decode(answer_ids, skip_special_tokens=True)
        cited = conv.cite(prompt.ids, answer_ids, options)
        planted = [c["seq"] for c in reader.manifest["chunks"] for p in c["source"]
                   if p.get("lines") and p["lines"][0] <= case.needle_line <= p["lines"][1]]
        row = {"case": i, "depth": round(case.depth, 3), "needle_line": case.needle_line, "planted_chunks": planted,
               "chunks": len(reader.manifest["chunks"]), "memory_tokens": memory.logical_length,
               "answer": answer, "right": str(case.number) in answer,
               "sources": [[ref.seq, round(share, 4)] for ref, share in cited]}
        row["first_is_planted"] = bool(cited) and cited[0][0].seq in planted
        rows.append(row)
        if on_case:
            on_case(row)
        store.remove(f"needle-{i}")
    right = [r for r in rows if r["right"]]
    hits = sum(r["first_is_planted"] for r in right)
    return {"task": "citation needle", "cases": len(rows), "answered_right": len(right),
            "first_source_is_planted_among_right": hits,
            "accuracy_among_right": round(hits / len(right), 4) if right else None,
            "first_source_is_planted_all": sum(r["first_is_planted"] for r in rows),
            "config": {"chunk_tokens": chunk_tokens, "max_tokens": max_tokens, "method": "full",
                       "cite_layers": list(options.layers) if options.layers else "upper half (default)",
                       "min_share": options.min_share, "limit": options.limit},
            "model": loaded.name, "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch."),
            "seconds": round(time.perf_counter() - t0, 1), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    from ..core.model import ModelSpec, load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    loaded = load_model(ModelSpec(args.model, args.device))
    with tempfile.TemporaryDirectory() as tmp:
        result = run(loaded, make_cases(args.cases, args.seed), Path(tmp),
                     on_case=lambda r: print(json.dumps({k: r[k] for k in ("case", "right", "first_is_planted",
                                                                            "planted_chunks", "sources")}),
                                             flush=True))
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    result["command"] = "python -m combllama.bench.cite_needle " + " ".join(sys.argv[1:] if argv is None else argv)
    summary = {k: result[k] for k in ("cases", "answered_right", "first_source_is_planted_among_right",
                                      "accuracy_among_right", "seconds")}
    print(json.dumps(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
