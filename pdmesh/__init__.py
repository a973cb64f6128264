"""pdmesh: a disaggregated LLM serving mesh. `pdmesh up` runs it locally; `pdmesh generate` streams
a completion. Generated API stubs live in pdmesh.v1 (from proto/pdmesh/v1)."""
