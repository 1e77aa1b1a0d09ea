# The two commands of the README, and their parts. Every target builds this clone's CPU environment
# (.venv/, scripts/env.sh) first if it is missing, so a new machine needs nothing but Python.
SHELL := /bin/bash
# A failed step of a pipeline fails the target (scripts/env.sh refusing, for one).
.SHELLFLAGS := -o pipefail -c

.PHONY: env demo test test-fast lint format compat docs
env:
	@bash scripts/env.sh | tail -n 1

demo:
	@env_dir="$$(bash scripts/env.sh | tail -n 1)" && \
	  "$$env_dir/bin/python" examples/demo.py $(ARGS)

test:
	@bash scripts/test.sh $(ARGS)

# The inner loop: lint and every test that starts no vLLM engine, no `vllm serve` and no
# example or benchmark script (pytest markers engine, server, script).
test-fast:
	@bash scripts/test.sh -m "not engine and not server and not script" $(ARGS)

lint:
	@env_dir="$$(bash scripts/env.sh | tail -n 1)" && \
	  "$$env_dir/bin/ruff" check . && "$$env_dir/bin/ruff" format --check .

format:
	@env_dir="$$(bash scripts/env.sh | tail -n 1)" && \
	  "$$env_dir/bin/ruff" check --fix . && "$$env_dir/bin/ruff" format .

# The front end against vLLM 0.33 (its own environment, .venv-compat/, no engine): scripts/compat.sh.
compat:
	@bash scripts/compat.sh $(ARGS)

# The documentation site (mkdocs.yml: MkDocs + Material, API reference by mkdocstrings), built
# strictly (a broken link, anchor or reference fails) into site/, which git ignores.
docs:
	@env_dir="$$(bash scripts/env.sh | tail -n 1)" && \
	  NO_MKDOCS_2_WARNING=1 "$$env_dir/bin/mkdocs" build --strict --site-dir site $(ARGS)
