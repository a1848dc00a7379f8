# One command runs every check. `make test` is what CI runs.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench venv clean sysdeps

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "edgewise needs Python >= 3.11"' \
		|| { echo "error: Python >= 3.11 is required (found $$($(PYTHON) --version))"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,ocr,tflite]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgewise demo

# System packages the tests need: Debian's chromium (console tests drive it headless with
# Playwright; no browser is downloaded), wrk (HTTP load generator for bench/runtime.py) and
# promtool (checks /metrics). Installed with apt-get when missing and we are root.
SYSDEPS_BINS := /usr/bin/chromium:chromium /usr/bin/wrk:wrk /usr/bin/promtool:prometheus
sysdeps:
	@missing=""; for pair in $(SYSDEPS_BINS); do bin=$${pair%%:*}; pkg=$${pair##*:}; \
		test -x $$bin || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null \
			|| { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; } \
			|| echo "warning: could not install$$missing (tests that need them fail under CI=true)"; \
		else echo "warning: please install$$missing (apt-get install$$missing)"; fi; fi

test: $(STAMP) sysdeps
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy src

bench: $(STAMP)
	@for f in bench/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
