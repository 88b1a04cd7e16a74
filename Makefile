# Two commands for a newcomer: `make demo` and `make test`; both set up .venv first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torchrec is installed with --no-deps: its package pulls the CUDA fbgemm-gpu, which does not
# import on a CPU machine. fbgemm-gpu-cpu (listed in pyproject.toml) replaces it. torchrec goes
# in last: pip then has no later install whose conflict check would report the "missing"
# fbgemm-gpu as an ERROR.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install torch==2.13.0 fbgemm-gpu-cpu==1.8.0
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps torchrec==1.8.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/recsys-hnm train --config pipelines/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f; done

clean:
	rm -rf $(VENV) build *.egg-info
