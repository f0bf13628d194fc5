"""The engine's KV block bookkeeping over one PagedKVCache: each sequence's block table
(seq.blocks), taking blocks from the allocator and dropping them, and automatic prefix caching
(matching a sequence's prompt against registered blocks at admission, registering blocks that
became full after a forward).

Full computed blocks are registered under a hash of (adapter digest, every token up to the
block's end); an admitted sequence takes references on the longest registered run of its
prompt's blocks and computes only the rest.
"""

from __future__ import annotations

import torch

from mintmesh.services.executor.config import ExecutorConfig
from mintmesh.services.executor.kv import PagedKVCache, prefix_block_hash
from mintmesh.services.executor.sequence import Sequence as Seq

__all__ = ["KVManager", "build_kv_cache"]


def build_kv_cache(
    model_config,
    config: ExecutorConfig,
    *,
    max_batch_size: int,
    max_positions: int,
    device: torch.device,
    dtype: torch.dtype,
) -> PagedKVCache:
    """The paged KV cache of config.kv_cache_bytes (0: room for max_batch_size sequences of
    up to 512 tokens, or max_positions when fewer) in blocks of config.kv_block_size."""
    kv_bytes = int(config.kv_cache_bytes)
    if not kv_bytes:
        tokens = max_batch_size * min(max_positions, 512)
        per_block = PagedKVCache.block_nbytes(model_config, config.kv_block_size, dtype)
        kv_bytes = per_block * -(-tokens // config.kv_block_size)
    return PagedKVCache.for_model(
        model_config,
        max_bytes=kv_bytes,
        block_size=int(config.kv_block_size),
        device=device,
        dtype=dtype,
    )


class KVManager:
    """Block tables and prefix caching of the sequences of one engine (its step thread)."""

    def __init__(self, kv: PagedKVCache, *, prefix_caching: bool, max_positions: int) -> None:
        self.kv = kv
        self.prefix_caching = bool(prefix_caching)
        self.max_positions = max_positions
        # Blocks kept free when admitting (so running sequences can grow a little).
        self.watermark = max(1, kv.num_blocks // 100)
        # seq_id -> hashes of the sequence's full blocks computed so far (a memo: tokens only
        # grow, so a block's hash never changes).
        self._block_hashes: dict[int, list[bytes]] = {}
        # Sequences holding only cached prefix blocks: their first own block starts a new run.
        self._after_hit: set[int] = set()

    def forget(self, seq: Seq) -> None:
        """seq has left the engine: its memoized hashes (and prefix-hit mark) go."""
        self._block_hashes.pop(seq.seq_id, None)
        self._after_hit.discard(seq.seq_id)

    def match_prefix(self, seq: Seq) -> int:
        """Prefix caching, at admission: references on the cached blocks of the longest
        registered prefix of seq's tokens under seq's own adapter digest (at least the last
        token is left to compute, for the logits to sample from); returns the tokens matched,
        now counted computed."""
        if not self.prefix_caching or seq.blocks or seq.num_computed:
            return 0
        full = (len(seq.tokens) - 1) // self.kv.block_size
        if full < 1:
            return 0
        al = self.kv.allocator
        blocks = al.lookup(self.hashes(seq, full))
        if not blocks:
            return 0
        al.acquire(blocks)
        self._after_hit.add(seq.seq_id)
        seq.blocks = list(blocks)
        seq.num_computed = len(blocks) * self.kv.block_size
        return seq.num_computed

    def hashes(self, seq: Seq, n: int) -> list[bytes]:
        """The prefix hashes of seq's first n full blocks (computed once per sequence)."""
        memo = self._block_hashes.setdefault(seq.seq_id, [])
        bs = self.kv.block_size
        while len(memo) < n:
            i = len(memo)
            memo.append(
                prefix_block_hash(
                    memo[-1] if memo else None, seq.digest, seq.tokens[i * bs : (i + 1) * bs]
                )
            )
        return memo[:n]

    def register_blocks(self, seq: Seq, before: int) -> None:
        """After a forward: the blocks of seq that became full (computed from `before` to
        seq.num_computed) become findable by their prefix hash."""
        bs = self.kv.block_size
        first, end = before // bs, seq.num_computed // bs
        if end <= first:
            return
        hashes = self.hashes(seq, end)
        al = self.kv.allocator
        for i in range(first, end):
            al.register(seq.blocks[i], hashes[i], owner=seq.digest or "")

    def release_blocks(self, seq: Seq) -> None:
        """seq's references on its blocks go (registered ones stay cached); its KV is gone."""
        if seq.blocks:
            self.kv.allocator.release(seq.blocks, key=seq.seq_id)
        seq.blocks = []
        seq.num_computed = 0
        self._after_hit.discard(seq.seq_id)

    def room(self, seq: Seq, reserve: int) -> int:
        """Tokens seq can add to its KV with its blocks and the free ones (less reserve)."""
        free = max(0, self.kv.allocator.num_free - reserve)
        return (len(seq.blocks) + free) * self.kv.block_size - seq.num_computed

    def acquire_blocks(self, seq: Seq, n: int) -> None:
        """The blocks seq needs for n more tokens (contiguous with its others when possible:
        a new run claims room for the sequence's whole expected length)."""
        need = self.kv.blocks_for(seq.num_computed + n) - len(seq.blocks)
        if need > 0:
            al = self.kv.allocator
            if seq.blocks and seq.seq_id not in self._after_hit:
                got = al.alloc(need, after=seq.blocks[-1])
            else:
                # A new run (after a cached prefix: right after it if that is free).
                opts = seq.handle.request.sampling
                total = len(seq.tokens) + max(0, opts.max_tokens - seq.generated)
                expect = self.kv.blocks_for(min(total, self.max_positions)) - len(seq.blocks)
                after = seq.blocks[-1] if seq.blocks else None
                got = al.alloc(need, after=after, key=seq.seq_id, expect=expect)
                self._after_hit.discard(seq.seq_id)
            if got is None:
                raise RuntimeError(f"sequence {seq.seq_id}: {need} KV blocks not free")
            seq.blocks += got
