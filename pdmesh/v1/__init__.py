"""Generated from proto/pdmesh/v1 by scripts/gen_protos.py. Do not edit."""
