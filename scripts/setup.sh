#!/usr/bin/env bash
# Creates .venv and installs everything pdmesh needs on a CPU host; idempotent and quiet when done.
# torch goes first and pinned: nixl-cu12 and transformers ask for an unpinned torch, which would
# otherwise pull a several-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip -q still prints one warning per missing local index directory on these hosts; drop those.
pip_install() { .venv/bin/pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
stamp=.venv/.pdmesh-installed
want=$(cat requirements.txt requirements-dev.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages into .venv (about 2 minutes the first time)"
  echo "setup: [1/4] torch 2.13.0 (CPU)"
  pip_install torch==2.13.0
  echo "setup: [2/4] runtime and test packages"
  pip_install -r requirements-dev.txt
  echo "setup: [3/4] NIXL (nixl-cu12) and [4/4] the pdmesh command"
  # `nixl` (the meta package) also wants nixl-cu13; we import nixl_cu12 directly.
  pip_install --no-deps nixl-cu12==1.5.1
  # The `pdmesh` command (editable: the repo is the code).
  pip_install --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
# Generated stubs are committed; regenerate only if someone deleted them.
[ -f pdmesh/v1/router_pb2.py ] || .venv/bin/python scripts/gen_protos.py
# Assemble the GGUF, dequantize to safetensors and build tokenizer.json once (cached on disk).
.venv/bin/python -m engine.weights --prepare
# buf (for the proto lint test) comes from npm, pinned.
if [ ! -x .cache/buf/node_modules/.bin/buf ] && command -v npm >/dev/null; then
  echo "setup: installing buf 1.75.0 from npm"
  npm install -q --prefix .cache/buf @bufbuild/buf@1.75.0 >/dev/null
fi
