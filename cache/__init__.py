"""The node-local adapter cache: an LMDB file written by the sidecar, read by the executor
(installed as mintmesh.cache)."""
