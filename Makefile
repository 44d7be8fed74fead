# Two commands on a fresh machine with Python 3.11:  make demo  (the main job)  and  make test.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get

.PHONY: install browser postgres demo test test-fast lint docs mlflow-ui stack stack-down clean-workspace

$(STAMP): pyproject.toml requirements-offline-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-offline-assets.txt
	touch $(STAMP)

install: $(STAMP)

browser:   ## headless Chromium (Debian's package) for the MLflow UI test
	@command -v chromium >/dev/null || $(APT) install -y --no-install-recommends chromium \
	  || { $(APT) update && $(APT) install -y --no-install-recommends chromium; }

postgres:   ## PostgreSQL server binaries (Debian's package) for the local production stack
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || $(APT) install -y --no-install-recommends postgresql \
	  || { $(APT) update && $(APT) install -y --no-install-recommends postgresql; }

demo: install   ## retrain on the next embedded demo release (SmolLM2 + Wikipedia summaries)
	$(BIN)/forgetless run

test: install browser postgres   ## everything, the slow SmolLM2 smoke run included (CI runs this)
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

lint: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

docs: install   ## serve the documentation site (mkdocs.yml, docs/) at http://127.0.0.1:8000
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

mlflow-ui: install   ## browse runs and the model registry of the embedded store
	$(BIN)/mlflow ui --backend-store-uri sqlite:///workspace/mlflow.db --workers 1

stack: install postgres   ## PostgreSQL, S3 (moto), MLflow, Prefect and a worker per pool, on loopback
	$(BIN)/python infra/stack.py up
	@echo "next: source .stack/env && $(BIN)/prefect --no-prompt deploy --prefect-file infra/prefect.yaml --all"

stack-down:   ## stop exactly what `make stack` started
	$(BIN)/python infra/stack.py down

clean-workspace:   ## forget every retrain (workspace, DVC remote); the model cache stays
	rm -rf workspace dvc-remote
