# Entry points: `make launch RECIPE=vgg_finetune [CLUSTER=local] [ARGS="trainer.epochs=2"]`, `make test`.
# ARGS go to `launcher launch` after the other options (overrides and options, any order);
# PRETRAIN_ARGS to the vgg_pretrain run that vgg_finetune needs first.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
PY := $(VENV)/bin/python
RECIPE ?= digits
CLUSTER ?= local
ARGS ?=
RUN_NAME ?=
PRETRAIN_ARGS ?=
PRETRAINED := artifacts/vgg_pretrain.pt

.PHONY: setup launch test test-fast bench slurm-up slurm-down vms-up vms-down clean

setup: $(VENV)/.installed

# Pinning torch first keeps pip from replacing it with a multi-GB CUDA build when resolving the rest.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev]" "torch==$(TORCH_VERSION)"
	touch $@

# vgg_finetune starts from weights that vgg_pretrain learned on the other half of the digits.
$(PRETRAINED): | setup
	$(PY) -m launcher launch vgg_pretrain --run-name vgg_pretrain --cluster $(CLUSTER) $(PRETRAIN_ARGS)
	$(PY) -m launcher export vgg_pretrain --to $(PRETRAINED) --cluster $(CLUSTER)

launch: setup $(if $(filter vgg_finetune,$(RECIPE)),$(PRETRAINED))
	$(PY) -m launcher launch $(RECIPE) --cluster $(CLUSTER) $(if $(RUN_NAME),--run-name $(RUN_NAME)) $(ARGS)

# Two pytest workers (pytest-xdist): many tests wait on Slurm, SSH or a server more than they compute.
# Each test file is one group (its module fixtures made once); everything that uses the machine's one Slurm
# or its loopback VMs is one group, run one at a time (tests/conftest.py). The `exclusive` tests then run
# alone. Exit status 5 (nothing selected, e.g. PYTEST_ARGS naming one file) is not a failure.
TEST_WORKERS ?= 2
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs --durations=25 -n $(TEST_WORKERS) --dist loadgroup -m "not exclusive" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs -m exclusive $(PYTEST_ARGS) || [ $$? -eq 5 ]

# the pure tests only (no processes, Slurm or GPU), for iteration
test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow and not slurm and not gpu" $(PYTEST_ARGS)

bench: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.run $(BENCH_ARGS)

slurm-up:
	bash scripts/slurm_local.sh start

slurm-down:
	bash scripts/slurm_local.sh stop

# loopback "VMs" for the vms backend (cluster_configs/local_vms.yaml): one sshd on 127.0.0.2-127.0.0.5
vms-up:
	bash scripts/vms_local.sh start

vms-down:
	bash scripts/vms_local.sh stop

clean:
	rm -rf runs artifacts bench/results
