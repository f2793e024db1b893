.PHONY: setup demo test lint

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/pyro-bc demo

test: setup
	OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -n auto --dist loadfile

lint: setup
	.venv/bin/ruff check .
