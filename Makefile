# megavrl: `make demo` and `make test` set everything up on a fresh machine.
#
# The virtual environment is created once and reused; it is reinstalled only when setup.py,
# this Makefile or the environment set-up code change (a stamp file records the last install).
# torch is installed first and pinned: on the CPU machines the pinned version resolves to a local
# CPU wheel, any other spec would pull the multi-GB CUDA build.

PYTHON       ?= python3
VENV         ?= .venv
PY           := $(VENV)/bin/python
TORCH_PIN    ?= torch==2.13.0
STAMP        := $(VENV)/.megavrl-installed
PYTEST_ARGS  ?=
DEMO_DIR     ?= runs/demo

.PHONY: venv demo test test-fast bench clean help

help:
	@echo "make demo       install, then run the tiny CPU demo (synthetic videos, tiny model)"
	@echo "make test       install, then run the whole test suite (PYTEST_ARGS='-k ...' to select)"
	@echo "make test-fast  the suite without tests marked slow"
	@echo "make venv       only create/update the virtual environment in $(VENV)"
	@echo "make bench      run every benchmark under bench/ (results in bench/results/)"

venv: $(STAMP)

$(STAMP): setup.py Makefile megavrl/envsetup/install_cpu_shims.py megavrl/envsetup/torchvision_cpu_shim.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN)
	@extra=$$($(PY) -c "import torch; print('gpu' if torch.version.cuda and torch.cuda.is_available() else 'cpu')"); \
	  echo "installing megavrl with extras [$$extra,dev]"; \
	  $(PY) -m pip install -q -e ".[$$extra,dev]" $(TORCH_PIN)
	$(PY) -m megavrl.envsetup.install_cpu_shims
	@touch $(STAMP)

test: venv
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no test for this selection (exit 5)" >&2; fi; \
	  exit $$rc

test-fast: PYTEST_ARGS += -m "not slow"
test-fast: test

demo: venv
	bash examples/demo.sh $(DEMO_DIR)

bench: venv
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
