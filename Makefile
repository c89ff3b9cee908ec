# layerguard: every target creates its own virtual environment first.
# The torch pin lives here only. A GPU user picks a build with e.g.
#   make test TORCH_SPEC='torch==2.13.0' TORCH_INDEX='--index-url https://download.pytorch.org/whl/cu124'
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.layerguard-installed

.PHONY: env demo test test-load bench lint clean promtool

env: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test,report]"
	touch $@

demo: $(STAMP)
	$(BIN)/python -m layerguard.demo $(DEMO_ARGS)

test: $(STAMP) promtool
	@mkdir -p build && date +%s > build/.test-start
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	@echo $$(( $$(date +%s) - $$(cat build/.test-start) )) > build/last-test-seconds  # read by scripts/refresh_docs.py

# promtool and prometheus (Debian's prometheus package) check the alert rules and the dashboard's queries in
# tests/test_ops.py. Installed here when missing and run as root; otherwise those tests skip (fail under CI).
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "promtool missing: apt-get install prometheus"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus) \
	      || echo "note: installing Debian's prometheus package failed; tests/test_ops.py will skip (fail under CI)"; \
	  else \
	    echo "note: promtool not found and not root: tests/test_ops.py skips its Prometheus checks (fails when CI is set)."; \
	    echo "      Install Debian's prometheus package: sudo apt-get install prometheus"; \
	  fi; }

test-load: $(STAMP)
	$(BIN)/python -m pytest -q -m load --run-load $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
