"""Start-up self-checks: every compiled or native kernel is run against its reference on a small
set of adversarial inputs before it may serve, and refused (the caller falls back, with one
warning naming it) when it disagrees.

The inputs are the extremes real models reach and mild tests do not: attention scores spanning
+-1000 (a one-hot softmax), scores that rise by hundreds from one online-softmax tile to the
next (issue 11: the native decode kernel left a stale accumulator there), all-equal scores,
very large and very small V, head dims that are not multiples of 8, one-token blocks; LoRA
adapters with large norms, mixed ranks (1 to 64), rows with no adapter, layers an adapter does
not target.

Each check returns None when the kernel agrees, else a sentence saying where it did not. They
take milliseconds (a few hundred small calls) and run once per process per kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from mintmesh.kernels.meta import BatchMeta, HostMeta, MetaTensors
from mintmesh.kernels.pool import LayerWeights

_EPS32 = 2.0**-23

# ---- decode attention ------------------------------------------------------------------------

# (heads, kv heads, head dim, block size, context lengths, regime)
_ATTN_CASES = (
    (4, 2, 16, 16, (31,), "wide"),
    (4, 2, 16, 16, (40, 7), "rising"),
    (2, 2, 3, 4, (17,), "rising"),
    (1, 1, 1, 1, (2, 9), "wide"),
    (8, 2, 64, 16, (200, 33), "one_hot"),
    (4, 4, 24, 16, (48,), "falling"),
    (4, 1, 40, 8, (37,), "equal"),
    (2, 1, 16, 16, (50,), "large_v"),
    (2, 1, 16, 16, (50,), "tiny_v"),
    (4, 2, 80, 16, (513, 1), "normal"),
)


def _attn_values(regime: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """q [H, D] of one sequence, k/v [ctx, KVH, D] in position order."""
    D = q.shape[-1]
    if regime == "wide":
        return q * 16, k * 16, v
    if regime == "one_hot":
        return q * (1000.0 / (scale * D**0.5)), k, v
    if regime == "equal":
        return q, k[:1].expand_as(k).clone(), v
    if regime in ("rising", "falling"):
        u = q.mean(0)
        u = u / u.norm().clamp_min(1e-6)
        pos = torch.arange(k.shape[0], dtype=k.dtype)
        if regime == "falling":
            pos = pos.flip(0)
        step = 40.0 / (scale * float(q.norm(dim=-1).mean().clamp_min(1e-3)))
        return q, k + (pos * step)[:, None, None] * u, v
    if regime == "large_v":
        return q, k, v * 1e4
    if regime == "tiny_v":
        return q, k, v * 1e-6
    return q, k, v


def attention_tolerance(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> float:
    """Absolute error bound of an fp32 attention output for one sequence: relative to max |V|,
    widened by the largest |q|.|k| sum (an fp32 score of size S is known to about S * 2^-23,
    and softmax turns an absolute score error into a relative weight error)."""
    qa = q.abs().reshape(-1, q.shape[-1]).double()
    ka = k.abs().reshape(-1, k.shape[-1]).double()
    score_mag = float((qa @ ka.T).max()) * scale
    return float(v.abs().max()) * (2e-5 + 16 * _EPS32 * score_mag) + 1e-30


def check_decode_attention(lib, threads: int = 1) -> str | None:
    """The native paged decode attention (kernels.native.AttnLib) on the adversarial cases,
    against float64 SDPA over the same blocks."""
    g = torch.Generator().manual_seed(1234)
    for H, KVH, D, bs, ctxs, regime in _ATTN_CASES:
        scale = D**-0.5
        need = [-(-c // bs) for c in ctxs]
        nblocks = sum(need) + 1
        perm = torch.randperm(nblocks, generator=g).tolist()
        tables, pos = [], 0
        for n in need:
            tables.append(perm[pos : pos + n])
            pos += n
        k = torch.randn(nblocks, bs, KVH, D, generator=g)
        v = torch.randn(nblocks, bs, KVH, D, generator=g)
        q = torch.randn(len(ctxs), H, D, generator=g)
        seqs = []
        for i, (t, c) in enumerate(zip(tables, ctxs, strict=True)):
            idx = torch.tensor(t)
            kk = k[idx].reshape(-1, KVH, D)
            vv = v[idx].reshape(-1, KVH, D)
            qi, kc, vc = _attn_values(regime, q[i], kk[:c], vv[:c], scale)
            q[i] = qi
            kk[:c], vv[:c] = kc, vc
            k[idx] = kk.reshape(len(t), bs, KVH, D)
            v[idx] = vv.reshape(len(t), bs, KVH, D)
            seqs.append((kc, vc))
        flat = [b for t in tables for b in t]
        starts = [0]
        for t in tables:
            starts.append(starts[-1] + len(t))
        out = torch.zeros(len(ctxs), H, D)
        ok = lib.decode(
            out,
            q.transpose(0, 1),
            k,
            v,
            torch.arange(len(ctxs), dtype=torch.int64),
            torch.tensor(ctxs, dtype=torch.int32),
            torch.tensor(starts, dtype=torch.int32),
            torch.tensor(flat, dtype=torch.int32),
            scale,
            threads,
        )
        what = f"H={H} KVH={KVH} D={D} block {bs} contexts {list(ctxs)} ({regime} scores)"
        if not ok:
            return f"it refused a supported shape: {what}"
        for i, (kc, vc) in enumerate(seqs):
            want = F.scaled_dot_product_attention(
                q[i][None, :, None].double(),
                kc.transpose(0, 1)[None].double(),
                vc.transpose(0, 1)[None].double(),
                scale=scale,
                enable_gqa=H != KVH,
            )[0, :, 0]
            err = float((out[i].double() - want).abs().max())
            tol = attention_tolerance(q[i], kc, vc, scale)
            if not err <= tol:  # also catches NaN
                return f"max error {err:.3g} > {tol:.3g} at {what}, sequence {i}"
    return None


# ---- LoRA ops --------------------------------------------------------------------------------

LoraRunner = Callable[[torch.Tensor, torch.Tensor, LayerWeights, MetaTensors, HostMeta], None]


def _lora_cases(device: torch.device) -> Iterator[tuple[str, LayerWeights, list[int], int, int]]:
    """(description, layer weights, row slots, in features, out features)."""
    g = torch.Generator().manual_seed(4321)
    # Three adapters of ranks 1, 37 and 64 over pages of 8 rows; slot 3 does not target the
    # layer (rank 0); magnitudes from 1e-3 to 1e2 per entry (norms in the thousands).
    PR = 8
    for n_in, n_out, mags in ((64, 96, (1.0, 30.0, 1e-3)), (33, 17, (100.0, 1.0, 5.0))):
        ranks = [1, 37, 64, 0]
        pages_per = [-(-r // PR) for r in ranks]
        P = sum(pages_per) + 2
        a = torch.zeros(P, PR, n_in)
        b = torch.zeros(P, PR, n_out)
        table = torch.zeros(len(ranks), max(pages_per), dtype=torch.int32)
        perm = torch.randperm(P, generator=g).tolist()
        pos = 0
        for s, (r, npg) in enumerate(zip(ranks, pages_per, strict=True)):
            m = mags[s] if s < len(mags) else 1.0
            for j in range(npg):
                p = perm[pos]
                pos += 1
                table[s, j] = p
                rows = min(PR, r - j * PR)
                a[p, :rows] = torch.randn(rows, n_in, generator=g) * m
                b[p, :rows] = torch.randn(rows, n_out, generator=g) * m
        lw = LayerWeights(
            a_pages=a.to(device),
            b_pages=b.to(device),
            page_table=table.to(device),
            ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
            scales=torch.tensor([2.0, 0.25, 4.0, 1.0], device=device),
        )
        for slots in ([0, 1, -1, 2, 3, 1], [2] * 19 + [-1] * 3 + [1] * 9 + [0] * 2 + [3]):
            shuffled = torch.tensor(slots)[torch.randperm(len(slots), generator=g)].tolist()
            for order in (slots, shuffled):
                yield f"{n_out}x{n_in}, ranks {ranks}, slots {order}", lw, order, n_in, n_out


def check_lora(run: LoraRunner, device: torch.device | str = "cpu") -> str | None:
    """A fused LoRA implementation (y += scale * (x A^T) B^T per row) against the reference,
    relative to the size of each row's delta."""
    from mintmesh.kernels.backends import ReferenceBackend

    device = torch.device(device)
    g = torch.Generator().manual_seed(99)
    ref = ReferenceBackend()
    for what, lw, slots, n_in, n_out in _lora_cases(device):
        meta = BatchMeta.make().prepare(torch.tensor(slots), device=device)
        md = meta.tensors(device)
        for x_mag in (1.0, 50.0):
            x = (torch.randn(len(slots), n_in, generator=g) * x_mag).to(device)
            y0 = torch.randn(len(slots), n_out, generator=g).to(device)
            got = y0.clone()
            run(got, x, lw, md, meta.host)
            want = y0.double().clone()
            ref.fused(want, x.double(), _as_double(lw), md)
            delta = (want - y0.double()).abs().amax(dim=1, keepdim=True)
            err = (got.double() - want).abs()
            bound = 1e-4 * (delta + 1.0)
            bad = ~(err <= bound)
            if bool(bad.any()):
                r = int(bad.any(dim=1).nonzero()[0])
                return (
                    f"row {r} (slot {slots[r]}) off by {float(err[r].max()):.3g} on a delta of "
                    f"{float(delta[r]):.3g} at {what}, |x| ~ {x_mag}"
                )
    return None


def _as_double(lw: LayerWeights) -> LayerWeights:
    return LayerWeights(
        a_pages=lw.a_pages.double(),
        b_pages=lw.b_pages.double(),
        page_table=lw.page_table,
        ranks=lw.ranks,
        scales=lw.scales.double(),
    )


def check_native_lora(lib, threads: int = 1) -> str | None:
    """The native LoRA library (kernels.native.NativeLib): fused, and shrink + expand."""

    def fused(y, x, lw, md, hm):
        if not lib.fused(y, x, lw, md, hm.num_segments, threads):
            raise _Refused

    def split(y, x, lw, md, hm):
        v = torch.zeros(x.shape[0], lw.a_pages.shape[1] * lw.page_table.shape[1])
        if not lib.shrink(v, x, lw, md, hm.num_segments, threads):
            raise _Refused
        if not lib.expand(y, v, lw, md, hm.num_segments, threads):
            raise _Refused

    for name, run in (("fused", fused), ("shrink + expand", split)):
        try:
            why = check_lora(run)
        except _Refused:
            return f"{name} refused a supported layout"
        if why is not None:
            return f"{name}: {why}"
    return None


class _Refused(Exception):
    pass
