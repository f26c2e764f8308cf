#!/usr/bin/env python3
"""Run one fuzz target under atheris (coverage-guided, libFuzzer):

    .venv/bin/python fuzz/run.py TARGET [libFuzzer flags] [OUTPUT_CORPUS_DIR] fuzz/corpus/TARGET

e.g. `fuzz/run.py manifest -max_total_time=60 -timeout=20 /tmp/new fuzz/corpus/manifest`. libFuzzer
writes new inputs to the first corpus folder and a crash-* file (with -artifact_prefix) per crash.
Targets and what counts as a crash: fuzz/targets.py.
"""
from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Instrument our code (and the parsers a document target exercises) for coverage feedback.
with atheris.instrument_imports(include=["combllama", "targets", "pypdf", "defusedxml", "charset_normalizer"]):
    import targets

    import combllama.core.memory.bundle  # noqa: F401
    import combllama.core.memory.format  # noqa: F401
    import combllama.ingest  # noqa: F401
    import combllama.ingest._pdf_worker  # noqa: F401
    import combllama.ingest.pdf  # noqa: F401


def main() -> None:
    # libFuzzer re-executes this script for -merge=1 with the flags only: the target name travels in
    # the environment so those children fuzz the same function.
    if len(sys.argv) > 1 and sys.argv[1] in targets.TARGETS:
        name = sys.argv.pop(1)
        os.environ["COMBLLAMA_FUZZ_TARGET"] = name
    else:
        name = os.environ["COMBLLAMA_FUZZ_TARGET"]
    target = targets.TARGETS[name]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
