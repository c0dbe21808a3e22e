# The README's two commands: `make book` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
JOBS ?= 2
BOOK_FLAGS := --toc book/_toc.yml --config _config.yml -W -n --keep-going --all

# Run a stage, print how long it took, keep its exit code (pytest's 5, "no tests", fails too).
timed = echo "==> $(1)"; start=$$(date +%s); $(2); rc=$$?; \
	echo "<== $(1): $$(( $$(date +%s) - start )) s (exit $$rc)"; exit $$rc

.PHONY: venv export test test-unit test-notebooks test-book book clean

$(STAMP): requirements.txt pyproject.toml
	@$(call timed,install .venv,\
	  ( [ -x $(PY) ] || $(PYTHON) -m venv $(VENV) ) && \
	  $(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt && \
	  $(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e . && \
	  touch $(STAMP))

venv: $(STAMP)

export: venv
	$(PY) tools/export.py

test-unit: venv
	@$(call timed,unit tests + export drift,$(PY) -m pytest -q -n $(JOBS) -p no:cacheprovider tests)

test-notebooks: venv
	@$(call timed,nbval over every chapter,\
	  $(PY) -m pytest -v --nbval-lax --nbval-current-env -n $(JOBS) --dist loadscope \
	    -p no:cacheprovider book/)

test-book: venv
	@$(call timed,book build (warnings are errors),$(VENV)/bin/jupyter-book build . $(BOOK_FLAGS))

test: test-unit test-notebooks test-book

book: venv
	@$(call timed,book build,$(VENV)/bin/jupyter-book build . $(BOOK_FLAGS))
	@echo "Open $(CURDIR)/_build/html/index.html"

clean:
	rm -rf _build .pytest_cache
