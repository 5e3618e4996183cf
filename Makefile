# The two set-up commands of README.md: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
APT_PEERS := skopeo docker-registry umoci runc curl apache2-utils podman docker.io haproxy nginx chromium chromium-driver
BENCH_PEERS := wrk

.PHONY: run test stress bench bench-quick bench-gc bench-proxy install install-test install-bench peers bench-peers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'

install-bench: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,bench]'

# Real peers the end-to-end tests run against (Debian packages; needs root).
peers:
	@missing=""; for p in $(APT_PEERS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

bench-peers: peers
	@dpkg -s $(BENCH_PEERS) >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BENCH_PEERS) >/dev/null; }

run: install
	$(BIN)/kura serve

test: install-test peers
	$(BIN)/python -m pytest -q -ra

stress: install-test peers
	$(BIN)/python -m pytest -q -ra -m stress

# The benchmark against the reference registry and skopeo (bench/; results in bench/results/).
bench: install-bench bench-peers
	$(BIN)/python -m bench

bench-quick: install-bench bench-peers
	$(BIN)/python -m bench --quick

bench-gc: install-test
	$(BIN)/python -m tests.bench_gc

bench-proxy: install-test
	$(BIN)/python -m tests.bench_proxy

clean:
	rm -rf $(VENV) data .pytest_cache
