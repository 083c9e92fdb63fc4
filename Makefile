# `make run`: the main job on its built-in default.  `make test`: the tests.
# Both create .venv first when needed (scripts/setup.sh). The tests run in two processes
# (pytest-xdist), each on one thread (tests/conftest.py).
.PHONY: setup run test lint bench

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/datainf detect-mislabeled

lint: setup
	.venv/bin/ruff check src tests benchmarks scripts examples

test: setup
	.venv/bin/ruff check src tests benchmarks scripts examples
	.venv/bin/python -m pytest -q -n 2

bench: setup
	.venv/bin/python benchmarks/bench_estimators.py
	.venv/bin/python benchmarks/bench_gradients.py
