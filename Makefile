# The two commands: `make demo` (set everything up, run the main job) and
# `make test` (the whole test suite against a real stack the tests start).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench stack-up stack-down stack-status clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "dmstream needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=68"
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

## setup: virtualenv, Python packages, Kafka jars, influxd, redis-server
setup: $(STAMP)
	$(BIN)/dmstream stack install

## demo: start the local stack and run the main job
demo: setup
	$(BIN)/dmstream stack up
	$(BIN)/dmstream demo

## test: lint, then every test (integration tests start and stop their own stack)
test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .

stack-up: setup
	$(BIN)/dmstream stack up

stack-down: $(STAMP)
	$(BIN)/dmstream stack down

stack-status: $(STAMP)
	$(BIN)/dmstream stack status

## clean: stop the stack and remove its state (keeps the downloaded tools)
clean: $(STAMP)
	$(BIN)/dmstream stack down
	rm -rf .dmstream/kafka .dmstream/influxdb .dmstream/redis .dmstream/faust .dmstream/run .dmstream/logs
