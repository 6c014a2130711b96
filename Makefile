# Two commands for a new user (see README.md):
#   make demo   set up .venv, build tiny models, merge them on a local Ray, show what it did
#   make test   set up .venv and run the test suite (what CI runs)
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# keep DeepSpeed/torch JIT caches inside the project, not in ~
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export RAY_AUTH_MODE ?= disabled
export RAY_DISABLE_USAGE_STATS ?= 1

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed $(VENV)/kfp/.installed

# torch first and pinned: on a CPU machine 2.13.0 is a local CPU build; an unpinned
# torch would pull a multi-GB CUDA build. Everything else in one pip command (s3fs and
# moto together keep botocore within what aiobotocore allows), then pip check.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip check
	touch $@

# the Kubeflow Pipelines SDK in a venv of its own, for tests/test_orchestrators.py to compile
# cluster/orchestrators/kubeflow_pipeline.py: in the main venv it would downgrade protobuf
# (7 -> 6) and requests under Ray and mergekit
$(VENV)/kfp/.installed: | $(VENV)/.installed
	$(PY) -m venv $(VENV)/kfp
	$(VENV)/kfp/bin/pip install -q kfp==2.17.3
	$(VENV)/kfp/bin/pip check
	touch $@

demo: setup
	$(BIN)/python -m pipelines.demo --workdir demo-out

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check sar_dist pipelines tests bench cluster

bench: setup
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python bench/merge_bench.py
	$(BIN)/python bench/fisher_bench.py
	$(BIN)/python bench/io_bench.py

clean:
	rm -rf demo-out bench/out bench/out-io
