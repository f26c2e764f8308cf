"""RULER's needle generator (the nvidia-long-context-eval wheel's data/synthetic/niah.py), run offline.

niah.py is a script: arguments parsed at import, a tokenizer chosen by name (its HF wrapper passes
trust_remote_code=True; tiktoken would download), nltk's punkt for sentences. We run it in-process
with runpy after three patches: `select_tokenizer` returns the model's own tokenizer, a stand-in
`nltk.tokenize.sent_tokenize` splits sentences with a regex (punkt data is not shipped), and the
template puts a separator between the haystack and the question so the haystack becomes the memory
and the question is asked after it. Seeds are fixed; wonderwords supplies the key words.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import runpy
import sys
import tempfile
import types
from pathlib import Path

from ..core.errors import BadInputError
from .cases import Case
from .corpora import RULER_PACKAGE, ruler_dir

SEP = "\u241e"  # never in the essays: where the document ends and the question starts
TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {type_needle_v} afterwards.\n{context}" + SEP +
            "What are all the special magic {type_needle_v} for {query} mentioned in the provided text? "
            "Answer with the {type_needle_v} only.")
# The RULER task configurations (synthetic.yaml) used here.
TASKS = {
    "niah_single_1": dict(type_haystack="repeat", type_needle_k="words", type_needle_v="numbers"),
    "niah_single_2": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers"),
    "niah_single_3": dict(type_haystack="essay", type_needle_k="words", type_needle_v="uuids"),
    "niah_multikey_1": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=4),
    "niah_multikey_2": dict(type_haystack="needle", type_needle_k="words", type_needle_v="numbers"),
    "niah_multikey_3": dict(type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids"),
}
_SENT = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def sent_tokenize(text: str, language: str = "english") -> list[str]:
    """Stand-in for nltk.sent_tokenize (punkt needs downloaded data): split after . ! ? before a capital."""
    return [s for s in _SENT.split(text) if s]


class _Tokenizer:
    """RULER's tokenizer interface over the model's own (already loaded) tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text_to_tokens(self, text: str):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tokens_to_text(self, tokens):
        return self.tokenizer.decode(tokens)


@contextlib.contextmanager
def _patched(tokenizer):
    """Stand-ins for nltk.tokenize and RULER's tokenizer module (the real one imports tenacity and
    the tokenizer back ends); everything restored on exit."""
    fake_nltk = types.ModuleType("nltk")
    fake_nltk.tokenize = types.ModuleType("nltk.tokenize")
    fake_nltk.tokenize.sent_tokenize = sent_tokenize
    fake_tok = types.ModuleType(f"{RULER_PACKAGE}.data.tokenizer")
    fake_tok.select_tokenizer = lambda *a, **k: _Tokenizer(tokenizer)
    names = {"nltk": fake_nltk, "nltk.tokenize": fake_nltk.tokenize, fake_tok.__name__: fake_tok}
    saved = {k: sys.modules.get(k) for k in names}
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.modules.update(names)
    try:
        yield
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def generate(tokenizer, task: str, length: int, samples: int, seed: int, tokens_to_generate: int = 32) -> list[dict]:
    """RULER's own samples for `task` at `length` tokens (input + answer budget): [{input, outputs, length}]."""
    try:
        import wonderwords  # noqa: F401  (niah.py draws its keys from it)
    except ImportError:
        raise BadInputError("RULER's generator needs wonderwords: run `make evals-data`") from None
    cfg = TASKS[task]
    script = ruler_dir() / "niah.py"
    with tempfile.TemporaryDirectory() as tmp, _patched(tokenizer):
        argv = [str(script), "--save_dir", tmp, "--save_name", task, "--tokenizer_path", "model",
                "--tokenizer_type", "hf", "--max_seq_length", str(length), "--tokens_to_generate",
                str(tokens_to_generate), "--num_samples", str(samples), "--random_seed", str(seed),
                "--template", TEMPLATE]
        for k, v in cfg.items():
            argv += [f"--{k}", str(v)]
        sys.argv = argv
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            runpy.run_path(str(script), run_name="__main__")
        rows = [json.loads(line) for line in (Path(tmp) / task / "validation.jsonl").read_text().splitlines()
                if line.strip()]
    return rows


def ruler_cases(tokenizer, tasks, lengths, samples: int, seed: int) -> list[Case]:
    cases = []
    for task in tasks:
        for length in lengths:
            for row in generate(tokenizer, task, length, samples, seed):
                document, question = row["input"].split(SEP)
                answers = tuple(row["outputs"])
                # The sentence that holds the first answer: where citation expects the first source.
                pos = document.find(answers[0])
                start = max(document.rfind(". ", 0, pos), document.rfind("\n", 0, pos)) + 1
                end = document.find(".", pos)
                needle = document[start:end + 1].strip()
                cases.append(Case("retrieval", f"{task}-{length}-{row['index']}", document, question=question,
                                  answers=answers, needle=needle, max_new_tokens=20,
                                  meta={"kind": task, "length": length, "depth": round(pos / len(document), 3),
                                        "source": "ruler_synthetic"}))
    return cases
