# The README's two commands: `make book` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
JOBS ?= 2
# Threads for each of the JOBS workers (pytest's, the chapters' kernels): the cores shared among
# them. With torch's default, one thread per core in every worker, they fight over the cores
# (OpenMP threads spin while they wait): on 2 cores the unit tests took 145 s instead of 114 s and
# the chapters 211 s instead of 146 s.
THREADS ?= $(shell n=$$(( $$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo $(JOBS)) / $(JOBS) )); echo $$(( n > 0 ? n : 1 )))
BOOK_FLAGS := --toc book/_toc.yml --config _config.yml -W -n --keep-going --all
# Last chapter first: the later chapters run longest (12_training alone is about a third of the
# execution), and with JOBS workers the longest must start early for the rest to fit beside it.
NOTEBOOKS := $(shell ls -r book/*.ipynb)
BUILD_LOG := _build/book-build.log

# Run a stage, print how long it took, keep its exit code (pytest's 5, "no tests", fails too).
timed = echo "==> $(1)"; start=$$(date +%s); $(2); rc=$$?; \
	echo "<== $(1): $$(( $$(date +%s) - start )) s (exit $$rc)"; exit $$rc

.PHONY: venv export notebooks test test-unit test-notebooks test-book test-browser chromium book clean

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
	@$(call timed,unit tests + export drift,OMP_NUM_THREADS=$(THREADS) $(PY) -m pytest -q -n $(JOBS) -p no:cacheprovider tests)

# Every chapter is executed once, JOBS at a time, into the jupyter-cache that the book build reads
# (_config.yml: execute_notebooks: cache). The cache is emptied first: its key is a notebook's code,
# not the package's, so an old record could hide a broken package. Any cell's error fails the stage
# with the notebook, the cell and its traceback.
notebooks: venv
	@$(call timed,execute every chapter once (fresh cache),\
	  OMP_NUM_THREADS=$(THREADS) $(PY) tools/execute.py --fresh --jobs $(JOBS) $(NOTEBOOKS))

test-notebooks: notebooks

# The book from the cache: every chapter must be found there (myst-nb logs "Using cached notebook");
# one it had to execute again ("Executing notebook") fails the stage.
test-book: notebooks
	@$(call timed,book build from the cache (warnings are errors),\
	  mkdir -p _build && ( set -o pipefail; $(VENV)/bin/jupyter-book build . $(BOOK_FLAGS) 2>&1 | tee $(BUILD_LOG) ) && \
	  echo "$$(grep -c 'Using cached notebook' $(BUILD_LOG)) notebooks read from the cache" && \
	  if grep 'Executing notebook' $(BUILD_LOG); then \
	    echo "the book build executed the notebooks above: tools/execute.py's cache missed them"; false; fi)

# Headless Chromium opens every page of the built book (tools/browser_check.py): maths typeset
# by the bundled MathJax with the network blocked, images loaded, no tracebacks, warnings or
# progress bars in outputs, no leaked {eq} or #| text, local links resolve; a screenshot of each
# page lands in _build/screenshots/. Debian's chromium is installed when missing and apt-get can
# (as root); where it cannot, the stage says so and is skipped.
CHROMIUM ?= /usr/bin/chromium

chromium:
	@if [ ! -x $(CHROMIUM) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  $(call timed,install Debian's chromium,\
	    ( apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends chromium ) >/dev/null 2>&1 || \
	    echo "apt-get could not install chromium"; true); fi

test-browser: test-book chromium
	@if [ -x $(CHROMIUM) ]; then \
	  $(call timed,the built book in headless Chromium,\
	    $(PY) tools/browser_check.py _build/html --chromium $(CHROMIUM)); \
	else echo "SKIPPED the browser test: no $(CHROMIUM), and apt-get could not install Debian's"\
	  "chromium here (root and apt-get needed; or set CHROMIUM=/path/to/chromium)"; fi

# The chapters first; then the unit tests run beside the book build and the browser check, which
# keep less than two cores busy (Sphinx is one process; the check loads one page at a time):
# 139 s together instead of 182 s one after the other, on 2 cores. Their output is held in
# _build/book-and-browser.log and printed after the unit tests'; either failing fails `make test`.
test: notebooks
	@mkdir -p _build; \
	( $(MAKE) --no-print-directory -o notebooks test-browser > _build/book-and-browser.log 2>&1; \
	  echo $$? > _build/book-and-browser.rc ) & \
	$(MAKE) --no-print-directory test-unit; unit=$$?; wait; \
	echo "==> the book build and the browser check, run beside the unit tests:"; \
	cat _build/book-and-browser.log; book=$$(cat _build/book-and-browser.rc); \
	[ $$unit = 0 ] && [ $$book = 0 ]

book: test-book
	@echo "Open $(CURDIR)/_build/html/index.html"

clean:
	rm -rf _build .pytest_cache
