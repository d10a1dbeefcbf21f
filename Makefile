# safepoint developer commands. `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast lint demo bench clean

# The stamp depends on the files that define the environment, so `make install`
# is a no-op (under a second) when nothing changed.
$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-dev.txt -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP)

# ruff reads its file set from pyproject.toml ([tool.ruff] include/extend-exclude).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: install lint
	$(PY) -m pytest -q

# The edit-test loop: everything but the end-to-end runs (marker e2e: processes killed
# and resumed, real training, concurrency races, the S3 server), the few heavy single
# tests and the long variants, on both cores, with a quarter of the Hypothesis examples.
# The folders whose every test is e2e are not even collected (importing Lightning and
# transformers alone costs seconds per worker).
# `make test` runs it all, serially, at full counts.
test-fast: install
	SAFEPOINT_HYPOTHESIS_PROFILE=fast $(PY) -m pytest -q -n 2 -m "not e2e and not heavy and not slow and not fuzz" \
		--ignore=tests/s3 --ignore=tests/lightning --ignore=tests/transformers

# The main job: train, crash with SIGKILL mid-run, resume, and check the result is
# bit-identical to an uninterrupted run.
demo: install
	rm -rf runs/demo
	-$(VENV)/bin/safepoint demo --root runs/demo --crash-at-epoch 12
	$(VENV)/bin/safepoint demo --root runs/demo

bench: install
	$(PY) bench/save_load.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache .hypothesis
