"""Low-rank (LoRA) ops over batches that mix adapters and ranks (installed as mintmesh.kernels).

The executor uses three things from here:
- AdapterPool: the device pool of adapter weights, keyed by digest, memory proportional to rank;
- BatchMeta: per-forward batch metadata (rows sorted by adapter, segments), built once, reused by
  every layer;
- apply_lora(y, x, layer, pool, meta): y += scale[a] * (x A[a]^T) B[a]^T for each row's adapter a.
"""

from mintmesh.kernels.api import AdapterPool, BatchMeta, apply_lora

__all__ = ["AdapterPool", "BatchMeta", "apply_lora"]
