# The two commands of README.md. Both set everything up first (idempotent).
.PHONY: setup setup-vllm run test test-vllm bench-engines lint-proto protos

setup:
	bash scripts/setup.sh

# Start router + prefill + decode workers locally on the real model. ARGS="--prefill 2 --decode 2"
run: setup
	.venv/bin/pdmesh up $(ARGS)

# Set up and run the whole test suite (the vLLM group is `make test-vllm`).
test: setup
	.venv/bin/python -m pytest -q tests -m "not vllm" $(ARGS)

# The vLLM backend: a separate venv (.venv-vllm, ~3.5 GB, ~4 min the first time) for vLLM workers.
setup-vllm: setup
	bash scripts/setup_vllm.sh

# vLLM decode workers behind the router (real vLLM processes; about 3 minutes).
test-vllm: setup-vllm
	.venv/bin/python -m pytest -q tests -m vllm $(ARGS)

# Built-in engine vs vLLM, same model, same machine, same run.
bench-engines: setup-vllm
	.venv/bin/python -m bench.engines --quick --json out/bench_engines.json

protos: setup
	.venv/bin/python scripts/gen_protos.py

lint-proto: setup
	.cache/buf/node_modules/.bin/buf lint
