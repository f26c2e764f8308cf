#!/usr/bin/env bash
# GPU-machine run of evals/kvcompose_long.py and bench/kvcompose_ingest.py (how the committed results were made).
# Carry: .carry/smol.partab, gguf/defusedxml/platformdirs wheels, .carry/sotu (the 2015+ speeches); a previous run
# left /tmp/smol/smol.partaa (split -b 50000000 of the embedded GGUF). RECENT=4096 for the keep_recent variant.
set -e
G=""
for f in $(find /tmp -name "*.gguf*" -size +40M 2>/dev/null); do
  if [ "$(stat -c %s $f)" = "98362432" ]; then G=$f; break; fi
done
if [ -z "$G" ] && [ -f /tmp/smol/smol.partaa ]; then cat /tmp/smol/smol.partaa .carry/smol.partab > /tmp/smol/model.gguf; G=/tmp/smol/model.gguf; fi
if [ -z "$G" ]; then echo "NO GGUF"; find /tmp -size +20M 2>/dev/null | head; exit 3; fi
echo "gguf: $G"; sha256sum $G | cut -c1-16
mkdir -p /tmp/smolsrc; [ "$G" = /tmp/smolsrc/model.gguf ] || cp $G /tmp/smolsrc/model.gguf
pip install -q --no-deps --upgrade --target /tmp/pylib .carry/gguf-0.19.0-py3-none-any.whl .carry/defusedxml-*.whl .carry/platformdirs-*.whl
export PYTHONPATH=/tmp/ns:/tmp/pylib
mkdir -p /tmp/ns/combllama && for d in core cli ingest sessions evals bench; do ln -sfn $PWD/$d /tmp/ns/combllama/$d; done
[ -f /tmp/smolhf/config.json ] || python - <<'PY'
import json, os
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("/tmp/smolsrc", gguf_file="model.gguf")
model = AutoModelForCausalLM.from_pretrained("/tmp/smolsrc", gguf_file="model.gguf")
os.makedirs("/tmp/smolhf", exist_ok=True)
save_model(model, "/tmp/smolhf/model.safetensors")
config = model.config.to_dict(); config.pop("quantization_config", None)
open("/tmp/smolhf/config.json", "w").write(json.dumps(config, indent=2))
model.generation_config.save_pretrained("/tmp/smolhf"); tok.save_pretrained("/tmp/smolhf")
print("converted")
PY
timeout 300 python -m combllama.evals.kvcompose_long --model /tmp/smolhf --device cuda --sotu .carry/sotu --start-years 2015,2020 --recent ${RECENT:-2048} --out $OUT/kvcompose-long 2>&1 | tail -12
[ -z "$BENCH" ] || timeout 150 python -m combllama.bench.kvcompose_ingest --shape llama-3.1-8b --tokens 8192,32768 --out $OUT/kvcompose-ingest 2>&1 | tail -9
