"""The HTTP gateway: OpenAI's /v1 API over the router's gRPC API (installed as
mintmesh.services.gateway). Imports no torch."""
