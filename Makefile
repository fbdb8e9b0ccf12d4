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
	$(PY) -m pip install --quiet -e '.[dev,ray,hf,flower,tensorboard,mlflow]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hetfl partition examples/quickstart.yaml
	$(VENV)/bin/hetfl compare examples/quickstart.yaml --algorithms fedavg,fedprox,fednova,scaffold,fedadam --out results/quickstart --overwrite
	$(VENV)/bin/hetfl runs --root results

# Two workers, each test file on one (its module fixtures stay together), the files that start hetfl processes
# first (tests/conftest.py orders them; --no-loadscope-reorder keeps that order); then, alone, the tests marked
# serial: rates and shaped links measured against the clock, and Ray clusters.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not serial" --durations=15
	$(PY) -m pytest -m serial --durations=10

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

# The gRPC messages and service of hetfl server / hetfl client: regenerate the committed
# federation_pb2*.py after editing federation.proto, with grpcio-tools 1.67.1 in a venv of its own
# (build/proto-venv). Its protoc (27.2) writes protobuf gencode 5.27.2, which protobuf runtimes 5.28
# to 7.x load (a runtime refuses gencode newer than itself), and its gRPC plugin asks for
# grpcio>=1.67.1 at import: the ranges in pyproject.toml, which let hetfl install beside flwr
# (protobuf<7). A newer grpcio-tools raises both floors: do not regenerate with the one in a project
# venv. Run from src/, so the generated modules import each other as hetfl.deploy.*.
PROTO_VENV  := build/proto-venv
GRPC_TOOLS  := grpcio-tools==1.67.1

.PHONY: proto
$(PROTO_VENV)/.installed:
	$(PYTHON) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/python -m pip install --quiet '$(GRPC_TOOLS)'
	touch $@

proto: $(PROTO_VENV)/.installed
	cd src && ../$(PROTO_VENV)/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. hetfl/deploy/federation.proto

# hetfl against Flower's simulation engine (docs/benchmarks.md). flwr itself is in .venv (hetfl[flower]);
# its simulation engine is not: flwr[simulation] pins ray==2.55.1, and .venv keeps the newer ray of
# hetfl[ray]. So the benchmark has a venv of its own: torch first (as above), then hetfl and
# flwr[simulation] in one resolve, which pip satisfies without a conflict (protobuf 6.x serves both).
# flwr 1.41.0 is the version docs/benchmarks.md measured; 1.42.0 installs too now that the index has
# certifi 2026.10.19.post1 (after rm -rf .venv-flower: FLWR='flwr[simulation]==1.42.0'). Options:
# ARGS='--repeats 5'.
FLOWER_VENV  := .venv-flower
FLOWER_STAMP := $(FLOWER_VENV)/.installed
FLWR         ?= flwr[simulation]==1.41.0

.PHONY: bench-flower
$(FLOWER_STAMP): pyproject.toml
	$(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOWER_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(FLOWER_VENV)/bin/python -m pip install --quiet -e '.[flower]' '$(FLWR)'
	touch $(FLOWER_STAMP)

bench-flower: $(FLOWER_STAMP)
	$(FLOWER_VENV)/bin/python benchmarks/flower_compare.py $(ARGS)

clean:
	rm -rf $(VENV) results build src/*.egg-info
