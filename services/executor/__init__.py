"""The executor: the resident backbone serving batches that mix LoRA adapters
(installed as mintmesh.services.executor).

- config.py: ExecutorConfig, the one frozen configuration;
- lora.py: the multi-LoRA layer wrapped around each targeted Linear;
- sources.py: where adapter bytes come from (the node cache sidecar) and device residency;
- engine.py: the core (plain Python/torch): batched forward, static-batch generation, sampling;
- servicer.py / server.py: the mintmesh.v1.Executor gRPC service over the engine.
"""

from mintmesh.services.executor.config import ExecutorConfig

__all__ = ["ExecutorConfig"]
