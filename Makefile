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
	$(PY) -m pip install --quiet -e '.[dev,ray,hf]'
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

# The gRPC messages and service of hetfl server / hetfl client: regenerate the committed
# federation_pb2*.py after editing federation.proto. Run from src/, so the generated modules import
# each other as hetfl.deploy.* (no relative-import fix needed). A newer protoc raises the protobuf
# lower bound in pyproject.toml to its version (the generated code checks it at import).
.PHONY: proto
proto:
	cd src && ../$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. hetfl/deploy/federation.proto

# hetfl against Flower's simulation engine (docs/benchmarks.md). flwr[simulation] goes into its own
# venv, never into .venv; the same order as above (torch first), then hetfl, then flwr. flwr 1.41.0
# (ray 2.55.1) installs beside hetfl and torch 2.13.0 on Python 3.11; flwr 1.42.0 asks for
# certifi>=2026.10.19, which the package index here did not have. Every flwr release wants protobuf<7,
# so pip downgrades hetfl's protobuf>=7.35.1 there and prints the conflict: only hetfl's gRPC
# deployment (hetfl.deploy) needs 7.x, and the benchmark does not import it. Options: ARGS='--repeats 5'.
FLOWER_VENV  := .venv-flower
FLOWER_STAMP := $(FLOWER_VENV)/.installed
FLWR         := flwr[simulation]==1.41.0

.PHONY: bench-flower
$(FLOWER_STAMP): pyproject.toml
	$(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOWER_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(FLOWER_VENV)/bin/python -m pip install --quiet -e .
	$(FLOWER_VENV)/bin/python -m pip install --quiet '$(FLWR)'
	touch $(FLOWER_STAMP)

bench-flower: $(FLOWER_STAMP)
	$(FLOWER_VENV)/bin/python benchmarks/flower_compare.py $(ARGS)

clean:
	rm -rf $(VENV) results build src/*.egg-info
