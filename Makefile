# memtier: `make demo` sets up from nothing and runs the main job; `make test` runs the checks.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.memtier-installed

.PHONY: setup demo test test-slow lint typecheck unit clean gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# torch first, from the pinned CPU build: a bare `torch` requirement would pull a multi-GB CUDA build
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@# DeepSpeed's async I/O wants libaio; best effort (memtier falls back to a thread pool without it)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s libaio-dev >/dev/null 2>&1; then \
	  (apt-get update -qq && apt-get install -y -qq libaio-dev) >/dev/null 2>&1 || echo "note: libaio-dev not installed; NVMe tier uses its thread-pool path"; fi
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev]'
	@# Build DeepSpeed's async I/O op once (minutes; cached in ~/.cache/torch_extensions); without it the NVMe
	@# tier uses its thread-pool path and the aio tests skip with the reason
	-@$(PY) -m offload.tiers.engines build
	@touch $@

demo: setup
	$(VENV)/bin/memtier probe --quick --out .memtier/local.yaml
	$(VENV)/bin/memtier plan --model llama-20m --cluster .memtier/local.yaml --global-batch 8 --seq 256 \
	  --micro-batch 4 --budget 400MiB --out .memtier/plan
	$(VENV)/bin/memtier launch --plan .memtier/plan/plan.json examples/train_lm.py --steps 8
	$(VENV)/bin/memtier bench --quick --cluster .memtier/local.yaml --out .memtier/bench

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy planner optim

unit: setup
	$(VENV)/bin/pytest -q -m "not slow"

# the tests marked slow (fresh-process RSS peaks of the memory modes, ~80 s): kept out of CI's 20 minutes
test-slow: setup
	$(VENV)/bin/pytest -q -m slow

test: lint typecheck unit

# Wheels the GPU check needs beyond the GPU machine's own torch/transformers (it has no network): PuLP (the
# planner's MIPs) and DeepSpeed (the ZeRO-Offload baseline) with what they import, for CPython 3.12 x86-64.
# Kept out of git (.git/info/exclude); the device run names `.whl` in `carry` (see benchmarks/gpu_check.sh).
WHEEL_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-wheels: setup
	@mkdir -p .whl && (grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(WHEEL_PLATFORMS) -d .whl pulp==3.3.2 hjson pydantic pydantic-core annotated-types typing-inspection
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps -w .whl deepspeed==$$($(PY) -m pip show deepspeed 2>/dev/null | sed -n "s/^Version: //p")

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .memtier
