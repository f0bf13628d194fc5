"""gRPC services of MinT mesh (installed as mintmesh.services)."""
