# Everything runs from the project's own virtualenv, .venv, made by `make venv`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-installs when pyproject.toml changes (new dependency), not on every run.
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
ARGS ?=

.PHONY: venv run test bench loadtest clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# A single-node broker: NATS on 4222, /metrics on 9090, data in ./mq9-data.
# MQ9_* variables and ARGS="--port 4333 ..." change settings.
run: venv
	$(BIN)/mq9 node $(ARGS)

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m loadtest.bench $(ARGS)

# locust (loadtest/locustfile.py) headless against a throwaway local node, then the
# summary: 50 users, 30 s. LOCUST_ARGS="-u 200 -t 2m" or ARGS="..." override locust's
# flags; with --host in them no node is started and that server is driven instead.
loadtest: venv
	LOCUST_ARGS="$(LOCUST_ARGS)" $(BIN)/python -m loadtest.run_locust $(ARGS)

# Keeps ./mq9-data: it holds the broker's messages.
clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
