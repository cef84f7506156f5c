# Everything sets itself up: `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean browser

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,tensorboard,ray]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ticketlab find --replicates 3 --out runs/demo

# Debian's chromium + chromium-driver for the report's real-browser test (no-op when present)
browser:
	bash scripts/install-chromium.sh

# MKL_DISABLE_FAST_MM: tests switch between thread and process lanes in one process, which MKL's
# buffer manager does not survive (src/ticketlab/train/process_lanes.py); MKL reads it at start
test: $(STAMP) browser
	MKL_DISABLE_FAST_MM=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/mnist1d_table.py

clean:
	rm -rf $(VENV) runs
