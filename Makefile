# hetfl: the two commands of the README are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench clean

# torch is installed first and pinned: on these machines torch==2.13.0 is a local CPU build;
# an unpinned torch would pull gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hetfl partition examples/quickstart.yaml
	$(VENV)/bin/hetfl compare examples/quickstart.yaml --algorithms fedavg,fedprox,fednova,scaffold,fedadam --out results/quickstart
	$(VENV)/bin/hetfl runs --root results

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) results build src/*.egg-info
