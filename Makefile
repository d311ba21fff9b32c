# plantgate — the commands of the README. Everything a test needs is installed from here.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test lint bench install dev mosquitto node-peers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
dev: $(STAMP)

demo: $(VENV)/.installed
	$(BIN)/plantgate demo $(if $(SECONDS),--seconds $(SECONDS),)

# The integration tests start a real mosquitto; install it from Debian when it is missing and we may.
mosquitto:
	@if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing mosquitto from Debian's packages"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	  else \
	    echo "mosquitto is missing: install it (apt-get install mosquitto); MQTT tests will be skipped"; \
	  fi; \
	fi

# node-opcua test server (supports TransferSubscriptions): installed from its lockfile when
# npm is present; without it the tests that need it are skipped with the reason.
NODE_PEER := tests/peers/node_opcua
node-peers:
	@if command -v npm >/dev/null 2>&1; then \
	  if [ ! -d $(NODE_PEER)/node_modules ] || [ $(NODE_PEER)/package-lock.json -nt $(NODE_PEER)/node_modules ]; then \
	    echo "Installing the node-opcua test server"; \
	    (cd $(NODE_PEER) && npm ci --no-audit --no-fund --loglevel=error) && touch $(NODE_PEER)/node_modules \
	      || echo "node-opcua could not be installed; the tests that need it will be skipped"; \
	  fi; \
	fi

# The unit's checks (tests/test_systemd_unit.py) run systemd-analyze: `verify`, and
# `security --offline=true`, which needs systemd >= 252 (Debian 12). Install it from
# Debian when it is missing and we may; it is only run on unit files, never started.
.PHONY: systemd-tools
systemd-tools:
	@if ! command -v systemd-analyze >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing systemd-analyze (package systemd) from Debian's packages"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null; \
	  else \
	    echo "systemd-analyze is missing: install it (apt-get install systemd); the unit checks will be skipped"; \
	  fi; \
	fi

# promtool (Debian package prometheus) checks docs/alerts.yml and runs its unit tests
# (tests/test_monitoring_docs.py); installed when missing and we may. Only the tool is used.
.PHONY: promtool
promtool:
	@if ! command -v promtool >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing promtool (package prometheus) from Debian's packages"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "promtool is missing: install it (apt-get install prometheus); the alert rule checks will be skipped"; \
	  fi; \
	fi

# The console's browser tests (tests/test_console_browser.py) drive Debian's Chromium with
# Playwright (installed by pip; it uses the system browser, nothing is downloaded). Installed
# when missing and we may; otherwise those tests are skipped with the reason.
.PHONY: chromium
chromium:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing chromium from Debian's packages (console browser tests)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else \
	    echo "chromium is missing: install it (apt-get install chromium); the console browser tests will be skipped"; \
	  fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check agent protocols buffer tests bench
	$(BIN)/mypy

test: lint mosquitto node-peers systemd-tools promtool chromium
	$(BIN)/pytest -q -p no:cacheprovider

bench: $(STAMP) mosquitto
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
