# The two commands of the README, and their parts. Every target builds this clone's CPU environment
# (.venv/, scripts/env.sh) first if it is missing, so a new machine needs nothing but Python.
SHELL := /bin/bash

.PHONY: env demo test lint format compat
env:
	@bash scripts/env.sh | tail -n 1

demo:
	@env_dir="$$(bash scripts/env.sh | tail -n 1)" && \
	  "$$env_dir/bin/python" examples/demo.py $(ARGS)

test:
	@bash scripts/test.sh $(ARGS)

lint:
	@env_dir="$$(bash scripts/env.sh | tail -n 1)" && \
	  "$$env_dir/bin/ruff" check . && "$$env_dir/bin/ruff" format --check .

format:
	@env_dir="$$(bash scripts/env.sh | tail -n 1)" && \
	  "$$env_dir/bin/ruff" check --fix . && "$$env_dir/bin/ruff" format .

# The front end against vLLM 0.33 (its own environment, .venv-compat/, no engine): scripts/compat.sh.
compat:
	@bash scripts/compat.sh $(ARGS)
