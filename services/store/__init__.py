"""The adapter store: the durable catalog of adapter revisions and their packed bytes
(installed as mintmesh.services.store)."""
