# The two commands of README.md. Both set everything up first (idempotent).
.PHONY: setup setup-vllm run test test-fast test-vllm bench-engines lint-proto protos

setup:
	bash scripts/setup.sh

# Start router + prefill + decode workers locally on the real model. ARGS="--prefill 2 --decode 2"
run: setup
	.venv/bin/pdmesh up $(ARGS)

# Set up everything (vLLM's venv included) and run the whole test suite, the vLLM group too.
test: setup-vllm
	.venv/bin/python -m pytest -q tests $(ARGS)

# The suite without the vLLM group (no .venv-vllm needed): the quick loop while developing.
test-fast: setup
	.venv/bin/python -m pytest -q tests -m "not vllm" $(ARGS)

# The vLLM backend: a separate venv (.venv-vllm, ~4 GB, ~2 min the first time) for vLLM workers.
setup-vllm: setup
	bash scripts/setup_vllm.sh

# Only the vLLM group: a vLLM prefill and a vLLM decode worker behind the router.
test-vllm: setup-vllm
	.venv/bin/python -m pytest -q tests -m vllm $(ARGS)

# Built-in engine vs vLLM, same model, same machine, same run.
bench-engines: setup-vllm
	.venv/bin/python -m bench.engines --quick --json out/bench_engines.json

protos: setup
	.venv/bin/python scripts/gen_protos.py

lint-proto: setup
	.cache/buf/node_modules/.bin/buf lint
