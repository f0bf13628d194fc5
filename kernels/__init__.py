"""Low-rank (LoRA) ops over batches that mix adapters and ranks (installed as mintmesh.kernels).

The executor uses:
- AdapterPool: the paged device pool of adapter weights, keyed by digest, memory proportional
  to rank (pool.py);
- BatchMeta: per-forward batch metadata (rows sorted by adapter, segments), built once in
  preallocated buffers, reused by every layer (meta.py);
- apply_lora(y, x, layer, pool, meta): y += scale[a] * (x A[a]^T) B[a]^T for each row's adapter;
- backend_name(device): the implementation serving a device ("triton", "cpu", "reference").

The ops themselves (lora_shrink, lora_expand, lora_fused; torch custom ops mintmesh::*) are in
ops.py, their plain-torch semantics in reference.py, the implementations in cpu.py and
triton_ops.py, the selector in backends.py.
"""

from mintmesh.kernels.api import AdapterPool, BatchMeta, apply_lora
from mintmesh.kernels.backends import backend_name, select_backend, set_backend
from mintmesh.kernels.ops import lora_expand, lora_fused, lora_shrink

__all__ = [
    "AdapterPool",
    "BatchMeta",
    "apply_lora",
    "backend_name",
    "lora_expand",
    "lora_fused",
    "lora_shrink",
    "select_backend",
    "set_backend",
]
