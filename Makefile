# The two commands of README.md. Both set everything up first (idempotent).
.PHONY: setup run test lint-proto protos

setup:
	bash scripts/setup.sh

# Start router + prefill + decode workers locally on the real model. ARGS="--prefill 2 --decode 2"
run: setup
	.venv/bin/pdmesh up $(ARGS)

# Set up and run the whole test suite.
test: setup
	.venv/bin/python -m pytest -q tests $(ARGS)

protos: setup
	.venv/bin/python scripts/gen_protos.py

lint-proto: setup
	.cache/buf/node_modules/.bin/buf lint
