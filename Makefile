# Two commands do all the set-up on a fresh machine with Python 3 and pip:
#   make test   create .venv on first use, install, run the test suite
#   make demo   create .venv on first use, install, run the main job
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# One torch thread per process: on a shared 2-core machine two threads were measured 10-30x slower.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: test demo install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	# openpi's published client, to test the server against it unchanged; it pins numpy<2
	# (which it does not need), so it is installed without its dependencies
	$(BIN)/python -m pip install --quiet --no-deps openpi-client==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m policy_accel.demo

clean:
	rm -rf $(VENV) .pytest_cache
