# Every target sets up what it needs: a fresh machine needs only python3 (3.10+) and make.
PYTHON ?= python3
TORCH ?= torch==2.13.0
PORT ?= 8888
VENV := .venv
BIN := $(VENV)/bin
READY := $(VENV)/.minilora-installed

.PHONY: setup test lint lab tune notebooks graduate student grade bench clean

setup: $(READY)

# Torch is installed first and pinned, so the package's own range never pulls a different (multi-GB) build.
$(READY): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(READY)

lint: $(READY)
	$(BIN)/ruff check .

# A second floating-point environment on the same machine: torch's scalar kernels instead of the CPU's vector ones,
# MKL's compatible code path and one thread. Matmuls, softmaxes and sums then round differently in their last bits,
# as on another reader's CPU; the stored notebook outputs and the oracle tests must pass under both.
SECOND_FP_ENV := ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1

# Tests whose outcome cannot depend on the floating-point environment: the exercise checks' trials and the graders'
# tests (ours and nbgrader's) run notebooks once more to see checks pass or fail, the checkpoint and distributed
# tests compare two runs made in the same environment, and the measured-memory tests read the RSS. They run once, and
# the notebook-running ones two at a time (pytest-xdist, one thread each: a 2-core machine runs two kernels at once).
ONCE := tests/test_exercises.py tests/test_grade.py tests/test_nbgrader.py
SAME_ENV := tests/test_checkpoints.py tests/test_distributed.py tests/test_memory_measured.py

# Lint, the graduation (drift) check, the tests that run once, then unit, oracle and end-to-end tests plus strict
# nbval over notebooks/, then those again under the second floating-point environment (but the SAME_ENV ones).
test: lint
	$(BIN)/python -m minilora graduate --check
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 $(ONCE)
	$(BIN)/python -m pytest $(addprefix --ignore=,$(ONCE))
	@echo "== second pass: $(SECOND_FP_ENV)"
	$(SECOND_FP_ENV) $(BIN)/python -m pytest $(addprefix --ignore=,$(ONCE) $(SAME_ENV))

# Jupyter refuses root unless told; containers and cloud notebooks often run as root.
lab: $(READY)
	$(BIN)/jupyter lab --notebook-dir=notebooks --port=$(PORT) $(if $(filter 0,$(shell id -u)),--allow-root)

# QLoRA+AdaLoRA-tune the bundled tiny Llama end to end; pass options with ARGS="--steps 600 --method lora".
tune: $(READY)
	$(BIN)/python -m minilora tune $(ARGS)

# Re-run every notebook in place and store its outputs (after editing one, then commit the result).
notebooks: $(READY)
	$(BIN)/python -m minilora graduate
	$(BIN)/python -m minilora notebooks

graduate: $(READY)
	$(BIN)/python -m minilora graduate

student: $(READY)
	$(BIN)/python -m minilora student --out student

# Run the student editions and report each exercise; exits 1 (make says so) unless every exercise passed.
grade: $(READY)
	$(BIN)/python -m minilora grade student

bench: $(READY)
	for script in bench/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) student .pytest_cache .ruff_cache
