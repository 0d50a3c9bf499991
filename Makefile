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

# LeRobot 0.6.1 needs Python >= 3.12 and imports torchvision, whose wheels pair with torch's
# default (CUDA) builds, not the CPU wheel .venv pins: its drop-in is tested in a venv of its own
# (about 4 minutes and 5 GB to build here, the torch pair matching the LeRobot fixtures').
LEROBOT_VENV := .venv-lerobot
LEROBOT_STAMP := $(LEROBOT_VENV)/.installed
# the first candidate that runs: a pyenv shim is on PATH even where its version is not selected
# (it exits 127), so each is tried, then pyenv's own installs
PYTHON312 ?= $(shell for p in python3.12 python3.13 $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[23]*/bin/python3; do \
	"$$p" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null && { command -v "$$p"; break; }; done)
LEROBOT_PACKAGES := 'lerobot[diffusion]==0.6.1' torch==2.11.0 torchvision==0.26.0 gym-pusht==0.1.8 pytest websockets msgpack

# The device check (policy_accel.bench.gpu). On a machine with a CUDA torch (the lent GPU
# machine: its own python3 and torch, no registry) it installs the few wheels that machine lacks
# from $(GPU_WHEELS) (fetched here beforehand by `make gpu-wheels`) into a temporary folder; on
# any other machine it runs the same script on the CPU with tiny sizes.
GPU_WHEELS := .wheels-gpu
GPU_WHEEL_PINS := diffusers==0.42.1
GPU_SITE := /tmp/policy-accel-site

.PHONY: test test-lerobot demo install clean bench-gpu gpu-wheels

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

$(LEROBOT_STAMP): pyproject.toml
	@test -n "$(PYTHON312)" || { echo "make test-lerobot needs python3.12 or newer (LeRobot 0.6.1)"; exit 1; }
	test -x $(LEROBOT_VENV)/bin/python || $(PYTHON312) -m venv $(LEROBOT_VENV)
	$(LEROBOT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LEROBOT_VENV)/bin/python -m pip install --quiet $(LEROBOT_PACKAGES)
	$(LEROBOT_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(LEROBOT_STAMP)

# the LeRobot drop-in against LeRobot itself (tests/integrations; skipped in .venv)
test-lerobot: $(LEROBOT_STAMP)
	$(LEROBOT_VENV)/bin/python -m pytest tests/integrations $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m policy_accel.demo

gpu-wheels:
	python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(GPU_WHEELS) $(GPU_WHEEL_PINS)

bench-gpu:
	@if python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then \
		python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
			--upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl && \
		PYTHONPATH=$(GPU_SITE):$(CURDIR) OMP_NUM_THREADS=1 python3 -m policy_accel.bench.gpu $(BENCH_ARGS); \
	else \
		$(MAKE) --no-print-directory install && $(BIN)/python -m policy_accel.bench.gpu $(BENCH_ARGS); \
	fi

clean:
	rm -rf $(VENV) $(LEROBOT_VENV) .pytest_cache
