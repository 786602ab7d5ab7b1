# mpitrain: `make train` and `make test` set everything up on a fresh machine.
#
#   make install   venv + package + test tools (+ PyPI's MPICH when no mpiexec exists)
#   make train     default training job (MLP on digits) on NP ranks
#   make test      ruff, then pytest under mpiexec at 1, 2, 3 and 4 ranks
#   make bench     collective benchmark (nccl-tests style) on NP ranks, then the training
#                  benchmark at 1, 2 and 4 ranks (against PyTorch DDP when torch is installed),
#                  then every strategy at 4 ranks with and without stragglers, then the
#                  pipeline schedules at 2 and 4 stages (against torch.distributed.pipelining)
#   make lint      ruff
#
# PYTHON=/path/to/python uses that interpreter instead of a .venv here.

VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
NP ?= 2
RANKS ?= 1 2 3 4
TEST_TIMEOUT ?= 900
PYBIN := $(dir $(PYTHON))
STAMP := build/.installed$(subst /,_,$(abspath $(PYTHON)))

# The launcher: the one PyPI's mpich wheel put beside $(PYTHON), else the system's.
MPIEXEC = $$(if [ -x $(PYBIN)mpiexec ]; then echo $(PYBIN)mpiexec; else command -v mpiexec; fi)
# Open MPI needs --oversubscribe for more ranks than cores; MPICH oversubscribes as it is.
MPIRUN = $(MPIEXEC) $$($(MPIEXEC) --version 2>&1 | grep -q "Open MPI" && echo --oversubscribe --timeout $(TEST_TIMEOUT) || true) -n
# Training jobs: under MPICH's Hydra the survivors' watchdogs name a rank that died, instead of
# the launcher killing them first (-disable-auto-cleanup); Open MPI names the rank itself.
TRAINRUN = $(MPIEXEC) $$($(MPIEXEC) --version 2>&1 | grep -q HYDRA && echo -disable-auto-cleanup; \
	$(MPIEXEC) --version 2>&1 | grep -q "Open MPI" && echo --oversubscribe || true) -n
# Open MPI refuses to run as root without these; MPICH ignores them.
export OMPI_ALLOW_RUN_AS_ROOT = 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM = 1

.PHONY: install train test bench lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@if [ "$(PYTHON)" = "$(VENV)/bin/python" ] && [ ! -x $(PYTHON) ]; then python3 -m venv $(VENV); fi
	$(PYTHON) -m pip install -q --upgrade pip
	@if [ -x $(PYBIN)mpiexec ] || command -v mpiexec >/dev/null; then \
		echo "using MPI: $$(command -v $(PYBIN)mpiexec || command -v mpiexec)"; \
	else \
		echo "no mpiexec on PATH: installing PyPI's mpich"; $(PYTHON) -m pip install -q mpich; \
	fi
	$(PYTHON) -m pip install -q -e '.[test,bench]'
	@mkdir -p build && touch $@

# Recipes print the command they run (the launcher resolved), not the shell plumbing that finds it.
train: install
	@cmd="$(TRAINRUN) $(NP) $(PYTHON) -m mpitrain train $(ARGS)"; echo $$cmd; $$cmd

lint: install
	$(PYTHON) -m ruff check mpitrain benchmarks tests examples
	$(PYTHON) -m ruff format --check mpitrain benchmarks tests examples

test: lint
	@set -e; for n in $(RANKS); do \
		if [ $$n -eq 1 ]; then only=""; else only="-m mpi"; fi; \
		cmd="$(MPIRUN) $$n $(PYTHON) -m mpi4py -m pytest -p no:cacheprovider -q --with-mpi $$only tests"; \
		echo MPIEXEC_TIMEOUT=$(TEST_TIMEOUT) $$cmd; \
		MPIEXEC_TIMEOUT=$(TEST_TIMEOUT) $$cmd; \
	done

bench: install
	@mkdir -p build
	@cmd="$(MPIRUN) $(NP) $(PYTHON) -m mpitrain bench collectives --json build/collectives.json \
		--plot build/collectives.png $(ARGS)"; echo $$cmd; $$cmd
	$(PYTHON) -m mpitrain bench training --json build/training.json --plot build/training.png
	$(PYTHON) -m mpitrain bench strategies --json build/strategies.json --plot build/strategies.png
	$(PYTHON) -m mpitrain bench pipeline --json build/pipeline.json

clean:
	rm -rf build $(VENV) *.egg-info
