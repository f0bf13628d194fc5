"""The paged KV cache and the attention function that reads and writes it.

Layout. One preallocated tensor per K and V, for every attention layer of the backbone:

    k[layer]: [num_blocks, block_size, num_kv_heads, head_dim]      (v likewise)

A sequence owns a *block table*: the ids of the blocks that hold its tokens in order, token p of
the sequence at (blocks[p // block_size], p % block_size). Blocks are fixed-size and come from
one allocator (BlockAllocator); the cache is bounded in bytes (num_blocks = bytes / block bytes),
so a sequence that cannot get blocks waits or is preempted, never fails. Blocks are
reference-counted: full blocks are registered under a prefix hash (adapter digest + tokens,
chained) and shared read-only by later sequences with the same prefix (automatic prefix
caching); unreferenced registered blocks stay cached until an allocation evicts them.

Attention. `paged_attention` is registered in transformers' AttentionInterface under
ATTN_IMPLEMENTATION; the model's own modules (q/k/v/o projections, rotary embedding, our
MultiLoraLinear wrappers) run unchanged and hand it the new tokens' Q, K, V of one packed row
([1, heads, T, head_dim], T = every new token of every sequence in the step, each at its own
position). An AttentionPlan, passed to the model as the `mint_plan` keyword, says which tokens
belong to which sequence; the function writes the new K/V into the sequences' blocks and attends
each sequence's queries over its own context:

- fresh sequences (no cached context: a first prefill chunk, or a Forward row): causal attention
  over the new tokens themselves, no gather;
- decode tokens (one new token after a cached context): on CPU with an fp32 cache, one call per
  layer into the native kernel (kernels/attn_cpu.cpp via kernels.native.load_attn: online
  softmax over each sequence's blocks, read in place through its block table, no copy or
  padding); otherwise as below (a context in one run of blocks) or batched, K/V gathered
  block-wise from the block tables, padded to the longest context and masked;
- later prefill chunks (several new tokens after a cached context): gathered per sequence, with
  a causal mask offset by the context length.

Without a plan the function is plain SDPA (the mask transformers built), so the model stays
usable as an ordinary HF model.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mintmesh.kernels import native
from mintmesh.kernels.settings import SETTINGS

logger = logging.getLogger(__name__)


# Tokens attended by each implementation (counted once per forward, at layer 0): which code
# served is observable, so a test can assert the path it means to cover really ran.
# native_decode: kernels/attn_cpu.cpp; torch_decode: SDPA over gathered blocks (no library,
# or a layout it does not take); prefill: SDPA over fresh tokens, runs and chunks.
ATTENTION_TOKENS = {"native_decode": 0, "torch_decode": 0, "prefill": 0}

ATTN_IMPLEMENTATION = "mintmesh_paged"
_registered = False


class BlockAllocator:
    """Bookkeeping of fixed-size KV blocks (ids 0..num_blocks-1).

    Any free block serves any sequence (paging), but the allocator keeps a sequence's blocks
    contiguous when it can, so attention can read them as a zero-copy view: a new sequence
    gets a run of free blocks with room for its expected length (prompt + max_tokens), which is
    *claimed* (softly: other new sequences look elsewhere first, but may take claimed blocks
    when nothing else is free), and a growing sequence takes the block right after its last.

    Prefix caching. Blocks are reference-counted. A full block whose K/V is computed may be
    registered under a prefix hash (`prefix_block_hash`: its adapter digest and every token up
    to its end, chained). When its last reference goes, a registered block is not plainly free
    but *cached*: still counted in num_free, kept in an LRU order, and found by `lookup` until
    an allocation that the plainly free blocks cannot satisfy evicts it (least recently freed
    first; its hash entry goes with it). Blocks are shared read-only: only full, registered
    blocks are ever shared, and a sequence writes only past its shared prefix.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks {num_blocks} must be >= 1")
        self.num_blocks = int(num_blocks)
        # 1 = not plainly free: referenced, or cached (unreferenced but holding a prefix).
        self._used = bytearray(self.num_blocks)
        self._refs = [0] * self.num_blocks
        self._claimed = bytearray(self.num_blocks)  # 1 = inside some sequence's claim
        self._claims: dict[object, tuple[int, int]] = {}
        # Unreferenced registered blocks, least recently freed first.
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self._owner: dict[int, str] = {}  # registered block -> adapter digest ("" = base)
        self.num_free = self.num_blocks  # plainly free + cached
        self.evictions = 0

    @property
    def num_used(self) -> int:
        """Blocks some sequence references."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Unreferenced blocks kept for their prefix (free for allocation, by eviction)."""
        return len(self._cached)

    @property
    def num_hashed(self) -> int:
        """Registered blocks, referenced or cached."""
        return len(self._by_hash)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def alloc(
        self,
        n: int,
        *,
        after: int | None = None,
        key: object = None,
        expect: int = 0,
    ) -> list[int] | None:
        """n blocks, or None (nothing taken) when fewer than n are free. after: the caller's
        last block (the run continues there if it is free); key/expect: claim a run of
        `expect` blocks for the owner `key` when starting a new run. Plainly free blocks go
        first; cached ones are evicted (least recently freed first) only for the shortfall."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            return None
        if n == 0:
            return []
        short = n - (self.num_free - len(self._cached))
        if short > 0:
            self._evict(short)
        used = self._used
        if (
            after is not None
            and after + n < self.num_blocks
            and used[after + 1 : after + 1 + n] == bytes(n)
        ):
            return self._take(range(after + 1, after + 1 + n))
        if key is not None and expect >= n:
            busy = int.from_bytes(used, "big") | int.from_bytes(self._claimed, "big")
            occupied = busy.to_bytes(self.num_blocks, "big")
            i = occupied.find(bytes(expect))
            if i < 0:
                i = occupied.find(bytes(n))
                expect = n
            if i >= 0:
                self.release_claim(key)
                self._claims[key] = (i, i + expect)
                self._claimed[i : i + expect] = b"\x01" * expect
                return self._take(range(i, i + n))
        i = used.find(bytes(n))
        if i >= 0:
            return self._take(range(i, i + n))
        out: list[int] = []
        pos = 0
        while len(out) < n:
            pos = used.find(0, pos)
            out.append(pos)
            pos += 1
        return self._take(out)

    def _evict(self, n: int) -> None:
        """Make n cached blocks plainly free (their prefixes forgotten)."""
        for _ in range(n):
            b, _ = self._cached.popitem(last=False)
            self._unregister(b)
            self._used[b] = 0
            self.evictions += 1

    def _unregister(self, b: int) -> None:
        del self._by_hash[self._hash_of.pop(b)]
        self._owner.pop(b, None)

    def _take(self, blocks) -> list[int]:
        out = list(blocks)
        for b in out:
            self._used[b] = 1
            self._refs[b] = 1
        self.num_free -= len(out)
        return out

    def release_claim(self, key: object) -> None:
        span = self._claims.pop(key, None)
        if span is not None:
            a, b = span
            self._claimed[a:b] = bytes(b - a)
            # Claims may overlap (a fallback took claimed blocks): re-mark the others.
            for c, d in self._claims.values():
                lo, hi = max(a, c), min(b, d)
                if lo < hi:
                    self._claimed[lo:hi] = b"\x01" * (hi - lo)

    def release(self, blocks: Sequence[int], *, key: object = None) -> None:
        """Drop one reference on each block (alloc's or acquire's); a block left unreferenced
        is plainly free, or cached when it is registered. Tail blocks are queued for eviction
        before the head of their sequence (the head is the part other prompts are likelier to
        share)."""
        for b in blocks:
            if self._refs[b] < 1:
                raise RuntimeError(f"KV block {b} released twice")
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b]:
                continue
            self.num_free += 1
            if b in self._hash_of:
                self._cached[b] = None
            else:
                self._used[b] = 0
        if key is not None:
            self.release_claim(key)

    # -- prefix cache ---------------------------------------------------------------------

    def register(self, block: int, block_hash: bytes, owner: str = "") -> bool:
        """Make a referenced, full, computed block findable under block_hash; owner: the adapter
        digest it was computed with ("" = base model), for forget(). False when that prefix is
        already registered (another block holds the same K/V) or the block already has a
        hash: then nothing changes."""
        if self._refs[block] < 1:
            raise RuntimeError(f"KV block {block} registered while not referenced")
        if block_hash in self._by_hash or block in self._hash_of:
            return False
        self._by_hash[block_hash] = block
        self._hash_of[block] = block_hash
        self._owner[block] = owner
        return True

    def forget(self, owner: str) -> int:
        """A deleted adapter: no prefix computed with it is found again. Its cached blocks
        become plainly free; blocks still referenced lose their hash (they are freed as usual
        when their sequences end). Returns how many blocks were unregistered."""
        blocks = [b for b, o in self._owner.items() if o == owner]
        for b in blocks:
            self._unregister(b)
            if b in self._cached:
                del self._cached[b]
                self._used[b] = 0
        return len(blocks)

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks of the longest registered run of hashes[0], hashes[1], ... (no
        reference taken)."""
        out: list[int] = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def acquire(self, blocks: Sequence[int]) -> None:
        """One more reference on each (registered) block; cached ones leave the LRU order."""
        for b in blocks:
            if b not in self._hash_of:
                raise RuntimeError(f"KV block {b} shared without a prefix hash")
            if self._refs[b] == 0:
                del self._cached[b]
                self.num_free -= 1
            self._refs[b] += 1


def prefix_block_hash(parent: bytes | None, adapter: str | None, tokens: Sequence[int]) -> bytes:
    """The hash of a full KV block: its parent block's hash (None for a sequence's first
    block), the adapter digest (None or "" = the base model) and the block's token ids. A
    chain of these names a whole prefix under one adapter revision, so cached K/V is reused
    only for the same digest and the same tokens, never across adapters or names."""
    h = hashlib.blake2b(digest_size=16, person=b"mintmesh-kv-v1")
    h.update(parent if parent is not None else b"\x00" * 16)
    a = (adapter or "").encode()
    h.update(len(a).to_bytes(2, "little"))
    h.update(a)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class PagedKVCache:
    """Preallocated K/V blocks for every attention layer, bounded in bytes."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        num_blocks: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size {block_size} must be >= 1")
        self.num_layers = int(num_layers)
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.block_size = int(block_size)
        self.num_blocks = int(num_blocks)
        self.device = torch.device(device)
        self.dtype = dtype
        shape = (self.num_layers, self.num_blocks, self.block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.allocator = BlockAllocator(self.num_blocks)
        logger.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB), %d layers, %d kv heads x %d, %s %s",
            self.num_blocks,
            self.block_size,
            self.nbytes / 2**20,
            self.num_layers,
            num_kv_heads,
            head_dim,
            self.device,
            dtype,
        )

    @staticmethod
    def block_nbytes(config, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block (K and V, every layer) for a HF model config."""
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        esize = torch.empty((), dtype=dtype).element_size()
        return 2 * int(config.num_hidden_layers) * block_size * kv_heads * head_dim * esize

    @classmethod
    def for_model(
        cls,
        config,
        *,
        max_bytes: int,
        block_size: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> PagedKVCache:
        per_block = cls.block_nbytes(config, block_size, dtype)
        num_blocks = int(max_bytes) // per_block
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_bytes {max_bytes} holds no KV block (one block of {block_size} tokens "
                f"is {per_block} bytes for this model)"
            )
        heads = int(config.num_attention_heads)
        return cls(
            num_layers=int(config.num_hidden_layers),
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            block_size=block_size,
            num_blocks=num_blocks,
            device=device,
            dtype=dtype,
        )

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-int(num_tokens) // self.block_size)


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's part of a packed forward: its new tokens are rows q_start..q_start+q_len-1
    of the row, and after them the sequence has ctx_len tokens (cached ones included)."""

    q_start: int
    q_len: int
    ctx_len: int
    blocks: Sequence[int] = ()


class AttentionPlan:
    """Per-forward attention metadata, built once on the host, read by every layer."""

    def __init__(self, spans: Sequence[SeqSpan], kv: PagedKVCache | None = None) -> None:
        self.kv = kv
        self.spans = list(spans)
        self.num_tokens = sum(s.q_len for s in self.spans)
        dev = kv.device if kv is not None else torch.device("cpu")
        self.fresh: list[tuple[int, int]] = []
        self.chunks: list[tuple[int, int, int, torch.Tensor]] = []
        # Sequences whose context blocks are one run: (q_start, q_len, ctx_len, first slot);
        # with the native kernel, its decode tokens (q_len 1) are attended there instead.
        self.runs: list[tuple[int, int, int, int]] = []
        decode: list[SeqSpan] = []
        # Decode tokens for the native kernel (CPU, fp32 cache, library loaded).
        self.native: native.AttnLib | None = None
        if kv is not None and kv.device.type == "cpu" and kv.dtype == torch.float32:
            self.native = native.load_attn(block=False)
        self.native_spans: list[SeqSpan] = []
        for s in self.spans:
            if s.q_len < 1 or s.ctx_len < s.q_len:
                raise ValueError(f"bad sequence span {s}: need 1 <= q_len <= ctx_len")
            if s.ctx_len == s.q_len:
                self.fresh.append((s.q_start, s.q_len))
                continue
            if kv is None:
                raise ValueError(f"span {s} has cached context but the plan has no KV cache")
            if s.q_len == 1 and self.native is not None:
                self.native_spans.append(s)
            nb = kv.blocks_for(s.ctx_len)
            b0 = s.blocks[0] if s.blocks else 0
            if (
                len(s.blocks) >= nb
                and s.blocks[nb - 1] == b0 + nb - 1
                and (nb < 3 or list(s.blocks[:nb]) == list(range(b0, b0 + nb)))
            ):
                self.runs.append((s.q_start, s.q_len, s.ctx_len, b0 * kv.block_size))
            elif s.q_len == 1:
                if self.native is None:
                    decode.append(s)
            else:
                nb = kv.blocks_for(s.ctx_len)
                self.chunks.append(
                    (s.q_start, s.q_len, s.ctx_len, torch.tensor(s.blocks[:nb], device=dev))
                )
        self.slot_mapping: torch.Tensor | None = None
        if kv is not None and self.spans:
            bs = kv.block_size
            parts = []
            for s in self.spans:
                nb = kv.blocks_for(s.ctx_len)
                if len(s.blocks) < nb:
                    raise ValueError(
                        f"span {s} needs {nb} KV blocks for {s.ctx_len} tokens, has {len(s.blocks)}"
                    )
                pos = torch.arange(s.ctx_len - s.q_len, s.ctx_len)
                table = torch.tensor(s.blocks[:nb], dtype=torch.long)
                parts.append(table[pos // bs] * bs + pos % bs)
            self.slot_mapping = torch.cat(parts).to(dev)
        if self.native_spans:
            flat: list[int] = []
            starts = [0]
            for s in self.native_spans:
                flat.extend(s.blocks[: kv.blocks_for(s.ctx_len)])
                starts.append(len(flat))
            self.native_rows = torch.tensor([s.q_start for s in self.native_spans])
            self.native_lens = torch.tensor(
                [s.ctx_len for s in self.native_spans], dtype=torch.int32
            )
            self.native_starts = torch.tensor(starts, dtype=torch.int32)
            self.native_blocks = torch.tensor(flat, dtype=torch.int32)
        self.decode_rows: torch.Tensor | None = None
        if decode:
            bs = kv.block_size
            max_nb = max(kv.blocks_for(s.ctx_len) for s in decode)
            tables = torch.zeros(len(decode), max_nb, dtype=torch.long)
            lens = torch.tensor([s.ctx_len for s in decode])
            for i, s in enumerate(decode):
                nb = kv.blocks_for(s.ctx_len)
                tables[i, :nb] = torch.tensor(s.blocks[:nb], dtype=torch.long)
            self.decode_rows = torch.tensor([s.q_start for s in decode], device=dev)
            self.decode_tables = tables.to(dev)
            mask = torch.arange(max_nb * bs)[None, :] < lens[:, None]
            self.decode_mask = mask[:, None, None, :].to(dev)

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        """query [1, H, T, D], key/value [1, KVH, T, D] (after rotary) -> [1, T, H, D]."""
        if query.shape[0] != 1 or query.shape[2] != self.num_tokens:
            raise ValueError(
                f"paged attention expects one packed row of {self.num_tokens} tokens, got query "
                f"{list(query.shape)}"
            )
        _, H, T, D = query.shape
        KVH = key.shape[1]
        gqa = H != KVH
        out = query.new_empty(T, H, D)
        kv = self.kv
        if kv is not None and self.slot_mapping is not None:
            kc = kv.k[layer].view(-1, KVH, D)
            vc = kv.v[layer].view(-1, KVH, D)
            kc.index_copy_(0, self.slot_mapping, finite_or_zero(key[0].transpose(0, 1)))
            vc.index_copy_(0, self.slot_mapping, finite_or_zero(value[0].transpose(0, 1)))
        for s, n in self.fresh:
            o = F.scaled_dot_product_attention(
                query[:, :, s : s + n],
                key[:, :, s : s + n],
                value[:, :, s : s + n],
                is_causal=n > 1,
                scale=scaling,
                enable_gqa=gqa,
            )
            out[s : s + n] = o[0].transpose(0, 1)
        if self.runs:
            assert kv is not None
            kc = kv.k[layer].view(-1, KVH, D)
            vc = kv.v[layer].view(-1, KVH, D)
            for s, n, ctx, first in self.runs:
                if n == 1 and self.native is not None:
                    continue  # a decode token: the native kernel's (below)
                # Zero-copy: the context is one run of blocks.
                k = kc[first : first + ctx].transpose(0, 1)[None]
                v = vc[first : first + ctx].transpose(0, 1)[None]
                mask = None
                if n > 1:
                    i = torch.arange(n, device=query.device)[:, None]
                    mask = torch.arange(ctx, device=query.device)[None, :] <= i + (ctx - n)
                o = F.scaled_dot_product_attention(
                    query[:, :, s : s + n], k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa
                )
                out[s : s + n] = o[0].transpose(0, 1)
        if self.chunks:
            assert kv is not None
            for s, n, ctx, table in self.chunks:
                k = _gather(kv.k[layer], table).view(-1, KVH, D)[:ctx].transpose(0, 1)[None]
                v = _gather(kv.v[layer], table).view(-1, KVH, D)[:ctx].transpose(0, 1)[None]
                i = torch.arange(n, device=query.device)[:, None]
                j = torch.arange(ctx, device=query.device)[None, :]
                mask = j <= i + (ctx - n)
                o = F.scaled_dot_product_attention(
                    query[:, :, s : s + n], k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa
                )
                out[s : s + n] = o[0].transpose(0, 1)
        if layer == 0:
            n_decode = sum(1 for s in self.spans if s.q_len == 1 and s.ctx_len > 1)
            ATTENTION_TOKENS["prefill"] += self.num_tokens - n_decode
            ATTENTION_TOKENS["torch_decode"] += n_decode - len(self.native_spans)
        if self.native_spans:
            assert kv is not None and self.native is not None
            if self.native.decode(
                out,
                query[0],
                kv.k[layer],
                kv.v[layer],
                self.native_rows,
                self.native_lens,
                self.native_starts,
                self.native_blocks,
                D**-0.5 if scaling is None else scaling,
                SETTINGS.attn_threads,
            ):
                if layer == 0:
                    ATTENTION_TOKENS["native_decode"] += len(self.native_spans)
            else:
                # A layout the kernel does not take (e.g. a query dtype other than the cache's).
                if layer == 0:
                    ATTENTION_TOKENS["torch_decode"] += len(self.native_spans)
                for s in self.native_spans:
                    table = torch.tensor(s.blocks[: kv.blocks_for(s.ctx_len)], device=out.device)
                    k = _gather(kv.k[layer], table).view(-1, KVH, D)[: s.ctx_len]
                    v = _gather(kv.v[layer], table).view(-1, KVH, D)[: s.ctx_len]
                    o = F.scaled_dot_product_attention(
                        query[:, :, s.q_start : s.q_start + 1],
                        k.transpose(0, 1)[None].to(query.dtype),
                        v.transpose(0, 1)[None].to(query.dtype),
                        scale=scaling,
                        enable_gqa=gqa,
                    )
                    out[s.q_start] = o[0, :, 0]
        if self.decode_rows is not None:
            assert kv is not None
            B = self.decode_rows.numel()
            q = query[0].index_select(1, self.decode_rows).transpose(0, 1)[:, :, None]
            k = _gather(kv.k[layer], self.decode_tables).view(B, -1, KVH, D).transpose(1, 2)
            v = _gather(kv.v[layer], self.decode_tables).view(B, -1, KVH, D).transpose(1, 2)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=self.decode_mask, scale=scaling, enable_gqa=gqa
            )
            out.index_copy_(0, self.decode_rows, o[:, :, 0])
        return out[None]


def finite_or_zero(t: torch.Tensor) -> torch.Tensor:
    """t with non-finite values as 0: what is written into the paged cache. Readers mask what is
    not theirs (padding to whole blocks, a reused block's stale tail, another sequence of the
    row) to an exact-zero weight, and 0 x inf is NaN: with no non-finite value in the cache, a
    sequence whose adapter overflowed cannot reach any other sequence through it. (One
    nan_to_num: 4 us for a 24-row decode step's keys of one layer on the CPU, where
    where(isfinite(t), t, 0) took 58 us.)"""
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def _gather(cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Whole blocks of one layer's cache [num_blocks, block_size, KVH, D] in table order:
    [table.numel() * block_size * KVH * D] (index_select copies contiguous rows; much faster
    than advanced indexing on CPU)."""
    return cache.view(cache.shape[0], -1).index_select(0, table.reshape(-1))


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers AttentionInterface function: paged attention when the forward carries a
    plan (`mint_plan`), plain SDPA otherwise."""
    plan: AttentionPlan | None = kwargs.pop("mint_plan", None)
    if plan is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return plan.attend(module.layer_idx, query, key, value, scaling), None


def use_paged_attention(model: torch.nn.Module) -> None:
    """Register paged_attention (once per process) and switch model to it."""
    global _registered
    from transformers import AttentionInterface

    if not _registered:
        AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
        _registered = True
    try:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    except (AttributeError, ValueError, KeyError):
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.config._attn_implementation = ATTN_IMPLEMENTATION
