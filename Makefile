# Set-up, demo and tests. Each target creates the virtualenv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PMM    := $(VENV)/bin/pathways-mm
STAMP  := $(VENV)/.installed
DEMO   ?= configs/experiments/demo.yaml

.PHONY: all install demo lint format test test-fast tokenizer gpu-check clean

all: test

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" "setuptools>=70" wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# --resume makes a second `make demo` reuse the finished run instead of training again.
# The routes step needs an MoE model (model.moe.num_experts > 0 in $(DEMO)).
demo: $(STAMP)
	$(PMM) train $(DEMO) --set train.out_dir=runs/demo --resume
	$(PMM) eval runs/demo --out runs/demo/eval.json --routes runs/demo/routes.json
	$(PMM) routes runs/demo/routes.json --out runs/demo/routes
	$(PMM) samples --out runs/demo/samples    # test inputs as PNG/WAV files for `predict` (README)

# The formatter and linter the field uses; configured in pyproject.toml. `make format` applies both.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not distributed and not slow"

# Every GPU figure in one run of minutes (docs/gpu.md); without CUDA a dry run on tiny configs.
# WHEELS=DIR: an offline GPU machine's $(PYTHON) instead of the virtualenv, DeepSpeed and the data
# packages installed from the wheels in DIR. Results: $(GPU_CHECK_OUT)/gpu_check.{md,json,log}.
WHEELS ?=
GPU_CHECK_OUT ?= runs/gpu_check
ifeq ($(WHEELS),)
gpu-check: $(STAMP)
	$(PMM) bench gpu-check --out $(GPU_CHECK_OUT)
else
gpu-check:
	PYTHON=$(PYTHON) sh scripts/gpu_check_offline.sh $(WHEELS) $(GPU_CHECK_OUT)
endif

tokenizer: $(STAMP)
	$(PY) -m pathways_mm.encoders.build_tokenizer

clean:
	rm -rf $(VENV) runs build *.egg-info
