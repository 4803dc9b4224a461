# Two commands: `make demo` (set up + run the toy pipeline) and `make test` (set up + tests).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_AUTH_MODE := disabled
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo test bench bench-peer clean up down gpu-wheels

install: $(STAMP)

# torch first and alone: `torch==2.13.0` takes the local CPU wheel; anything looser pulls CUDA.
$(STAMP): requirements.lock.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: install
	$(BIN)/opd run --config configs/toy.yaml

# Lint first (seconds): a format or lint error fails before the 20-minute suite starts.
test: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/pytest -q

bench: install
	$(BIN)/python -m benchmarks.teacher_scoring
	$(BIN)/python -m benchmarks.train_step
	$(BIN)/python -m benchmarks.opd_vs_baselines

# Ours vs TRL's DistillationTrainer on the demo (benchmarks/peer_trl.py). TRL runs in its own
# venv: torch first and alone (as above), then the pinned TRL stack; nothing at run time.
TRL_VENV := .venv-trl
TRL_STAMP := $(TRL_VENV)/.installed

$(TRL_STAMP): benchmarks/requirements-trl.lock.txt
	test -d $(TRL_VENV) || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/pip install -q torch==2.13.0
	$(TRL_VENV)/bin/pip install -q -r benchmarks/requirements-trl.lock.txt
	touch $(TRL_STAMP)

bench-peer: install $(TRL_STAMP)
	$(BIN)/python -m benchmarks.peer_trl --trl-python $(TRL_VENV)/bin/python

# Local Prefect stack: server (SQLite in .prefect/, 127.0.0.1:4200) + process worker + the
# deployments of prefect.yaml. `make down` stops exactly what `make up` started.
up: install
	$(BIN)/python scripts/prefect_stack.py up

down:
	$(BIN)/python scripts/prefect_stack.py down

# Wheels for scripts/gpu_check.sh on a GPU machine without network (CPython 3.12, x86_64):
# scripts/gpu_wheels.txt, at most 64 MiB in all (git-ignored; they travel with the checkout).
GPU_WHEELS := .gpu-wheels
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64
gpu-wheels: install
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(GPU_PLATFORMS) -d $(GPU_WHEELS) -r scripts/gpu_wheels.txt
	@size=$$(du -sm $(GPU_WHEELS) | cut -f1); echo "$(GPU_WHEELS)/: $$size MiB"; \
		test $$size -le 64 || { echo "more than the 64 MiB a checkout may carry"; exit 1; }

clean:
	rm -rf $(VENV) $(TRL_VENV) .cache artifacts/*-* artifacts/latest
