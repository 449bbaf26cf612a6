# The two commands a newcomer runs:  make demo   and   make test
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
REQ_HASH := $(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
# The stamp lives in the clone (not in a cached venv), so every clone re-links its own editable install.
STAMP := .venv-installed-$(REQ_HASH)
# Optional: keep the (5-6 GB) venv outside the clone, keyed by the requirements' hash (CI uses this).
VENV_CACHE ?=
DEMO_OUT ?= out/demo
PYTEST_ARGS ?=

.PHONY: help venv system-deps demo up down status test check lint format protos bench clean

help:
	@echo "make demo   - set up everything (venv, redis-server), start the stack, analyse the bundled samples"
	@echo "make test   - lint + type check + unit, integration and end-to-end tests (starts its own services)"
	@echo "make up | down | status | protos | bench | format | clean"

$(STAMP): requirements.txt pyproject.toml
	@if [[ -n "$(VENV_CACHE)" ]]; then \
	  target="$(VENV_CACHE)/venv-$(REQ_HASH)"; \
	  if [[ ! -f $$target/.complete ]]; then \
	    rm -rf "$$target" && mkdir -p "$(VENV_CACHE)" && $(PY) -m venv "$$target" && \
	    "$$target/bin/pip" install -q --upgrade pip && "$$target/bin/pip" install -q -r requirements.txt && \
	    touch "$$target/.complete" || exit 1; \
	  fi; \
	  rm -rf $(VENV); ln -s "$$target" $(VENV); \
	else \
	  [[ -x $(BIN)/python ]] || $(PY) -m venv $(VENV); \
	  $(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q -r requirements.txt || exit 1; \
	fi
	$(BIN)/pip install -q --no-deps -e .
	rm -f .venv-installed-*; touch $@

venv: $(STAMP)

# From the system's packages: redis-server, a Java runtime (TorchServe), prometheus + promtool (rules, dashboards,
# scraping the stack in tests), dcmtk (storescu / storescp / dsrdump: real DICOM peers), dicom3tools (dciodvfy
# validates the DICOM results) and orthanc (a real PACS for the integration tests).
system-deps:
	@missing=""; command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	 command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	 command -v promtool >/dev/null || missing="$$missing prometheus"; \
	 command -v dcmcjpeg >/dev/null || missing="$$missing dcmtk"; \
	 command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	 command -v Orthanc >/dev/null || [[ -x /usr/sbin/Orthanc ]] || missing="$$missing orthanc"; \
	 if [[ -n "$$missing" ]]; then \
	   echo "installing:$$missing"; \
	   if [[ $$(id -u) -eq 0 ]]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	   else sudo apt-get update -qq && sudo apt-get install -y -qq $$missing; fi; \
	 fi

demo: venv system-deps
	$(BIN)/cxr up
	$(BIN)/cxr analyze --wait --out $(DEMO_OUT) samples/*.dcm
	@echo "Heatmaps (overlay PNGs) are under $(DEMO_OUT)/. The stack is still running: 'make down' stops it."

up: venv system-deps
	$(BIN)/cxr up
down:
	$(BIN)/cxr down
status:
	$(BIN)/cxr status

check: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy cxr services training

test: venv system-deps check
	$(BIN)/pytest $(PYTEST_ARGS)

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

protos: venv
	scripts/gen_protos.sh $(BIN)/python

bench: venv system-deps
	$(BIN)/python benchmarks/bench_serving.py
	$(BIN)/python benchmarks/bench_training.py

clean:
	-$(BIN)/cxr down
	rm -rf .cxr out build *.egg-info .pytest_cache .mypy_cache .ruff_cache
