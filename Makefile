# `make run`: the main job on its built-in default.  `make test`: the tests.
# Both create .venv first when needed (scripts/setup.sh).
.PHONY: setup run test lint bench

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/datainf demo

lint: setup
	.venv/bin/ruff check src tests benchmarks

test: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python benchmarks/bench_estimators.py
