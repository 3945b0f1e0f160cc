# clbench: `make demo` (install + micro demo) and `make test` (install + test suite) are the two entry points.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SEEDS ?= 1,2,3
# Every method that exists (one conf/method/*.yaml each).
METHODS ?= $(shell ls conf/method | sed 's/\.yaml$$//' | paste -sd, -)

.PHONY: install demo test test-fast reproduce-micro clean-demo

install: $(VENV)/.installed

# torch is pinned (==2.13.0) and installed first: a looser pin would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# SeqFT and PIECE-S on the micro suite with the default model; runs and tables go to results/demo
# (not committed: re-running resumes or skips finished runs; `make clean-demo` starts over).
demo: install
	$(PY) -m clbench.run --multirun experiment=micro method=seqft,piece_s hydra.sweep.dir=results/demo
	$(PY) -m clbench.report results/demo

# The whole suite (slow tests included); pytest's "no tests collected" (exit 5) is not a failure.
test: install
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-fast: install
	$(PY) -m pytest -m "not slow"

# Every method × seeds on the micro suite (runs in runs/micro), then its tables and heatmaps in results/micro.
reproduce-micro: install
	$(PY) -m clbench.run --multirun experiment=micro method=$(METHODS) seed=$(SEEDS) hydra.sweep.dir=runs/micro
	# EPI's paper default H = 500 never refreshes in micro's 57 steps per task: also run it with H = 10.
	$(PY) -m clbench.run --multirun experiment=micro method=epi method.refresh_every=10 tag=-H10 seed=$(SEEDS) hydra.sweep.dir=runs/micro
	$(PY) -m clbench.report runs/micro --out results/micro

clean-demo:
	rm -rf results/demo
