# make demo / make test / make bench: each sets up .venv by itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; a GPU node overrides this (see README, "GPU nodes").
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test bench proto clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m cellfeed.server.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) bench/run_all.py

proto: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iproto/cellfeed/v1 --python_out=proto/cellfeed/wire --pyi_out=proto/cellfeed/wire proto/cellfeed/v1/cellfeed.proto

clean:
	rm -rf $(VENV) bench/results demo-data
