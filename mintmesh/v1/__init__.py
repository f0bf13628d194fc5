"""Generated gRPC stubs for the mintmesh.v1 wire API (python -m mintmesh.protogen)."""
