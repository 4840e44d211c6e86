# Two commands do all the set-up on a fresh machine:
#   make run    search a ResNet on the bundled digits data at half the dense MACs
#   make test   the whole test suite (what CI runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-quick test-postgres bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[nni,test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/nas-grouping search --budget 0.5 --out runs/digits-search-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

test-quick: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

# the tuning tests against a throwaway PostgreSQL server on 127.0.0.1 (root installs Debian's postgresql)
test-postgres: $(STAMP)
	@dir=$$(mktemp -d); trap 'bash .ci/postgres.sh stop "$$dir"; rm -rf "$$dir"' EXIT; \
	NAS_GROUPING_TEST_POSTGRES=$$(bash .ci/postgres.sh start "$$dir") $(BIN)/python -m pytest -q tests/test_tune_postgres.py

bench: $(STAMP)
	$(BIN)/nas-grouping bench dgconv

clean:
	rm -rf $(VENV) runs .pytest_cache
