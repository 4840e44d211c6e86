# Two commands do all the set-up on a fresh machine:
#   make run    train, compress (channels + self-grouping) and deploy a ResNet on the bundled digits data
#   make test   the whole test suite (what CI runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run search test test-quick test-postgres bench bench-speed clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[nni,deploy,test]"
	touch $(STAMP)

# train the dense ResNet-20 on digits, prune 40% of its channels and self-group it to 30% of the dense MACs
# (fine-tuned 15 epochs; latency measured beside the dense model at batch 1 and 32), then write the deployable ONNX file
run: $(STAMP)
	@out=runs/digits-$$(date +%Y%m%d-%H%M%S); \
	$(BIN)/nas-grouping train --out $$out/dense && \
	$(BIN)/nas-grouping compress --model $$out/dense --channels 0.4 --budget 0.3 --epochs 15 --lr 0.05 --out $$out/compressed && \
	$(BIN)/nas-grouping export --model $$out/compressed --out $$out/model.onnx && \
	echo "run folder: $$out (dense/, compressed/, model.onnx)"

# the DGConv search on digits at half the dense MACs (the main command before the deployable pipeline)
search: $(STAMP)
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

# Torch-Pruning is the speed benchmark's baseline, not our dependency: it lives in .bench-env/ only
BENCH_ENV := .bench-env
$(BENCH_ENV)/.installed: $(STAMP) constraints.txt
	$(BIN)/pip install -q --no-deps --target $(BENCH_ENV) "torch-pruning==1.6.1"
	touch $@

bench-speed: $(BENCH_ENV)/.installed
	mkdir -p runs
	PYTHONPATH=$(BENCH_ENV) $(BIN)/nas-grouping bench speed --out runs/bench-speed.csv

clean:
	rm -rf $(VENV) $(BENCH_ENV) runs .pytest_cache
