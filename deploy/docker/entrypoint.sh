#!/bin/sh
# pdmesh container entry point: the first argument names the service, the rest are its flags.
#   router|prefill|decode [FLAGS]   run that service (python -m services.NAME FLAGS; see --help)
#   prepare                         (re)build the model cache under $PDMESH_CACHE_DIR
#   anything else                   run it as a command (e.g. `sh`, `python -m pdmesh.cli ...`)
set -eu
service="${1:-router}"
[ "$#" -gt 0 ] && shift
case "$service" in
  router|prefill|decode) exec python -m "services.$service" "$@" ;;
  prepare) exec python -m engine.weights --prepare "$@" ;;
  *) exec "$service" "$@" ;;
esac
