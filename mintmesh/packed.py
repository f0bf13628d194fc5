"""The packed adapter format: one contiguous buffer per adapter revision.

Layout (little-endian):

    b"MINTPAK1" | u32 header_len | header (canonical JSON, utf-8) | zero pad to 64
    | tensor data: for each module (sorted by name) A [rank, in] then B [out, rank],
      each starting on a 64-byte boundary

Offsets in the header are relative to the start of the tensor data. One read and one
host-to-device copy load a whole adapter; the sha256 of the buffer is the revision's digest.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mintmesh.errors import InvalidAdapter

MAGIC = b"MINTPAK1"
FORMAT_VERSION = 1
ALIGN = 64
_PREFIX = struct.Struct("<8sI")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ModuleWeights:
    """One targeted Linear: A [rank, in], B [out, rank]; y += scale * x A^T B^T."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class PackedModule:
    name: str
    rank: int
    in_features: int
    out_features: int
    alpha: float
    scale: float
    a_offset: int
    b_offset: int


@dataclass(frozen=True)
class PackedHeader:
    format_version: int
    base_fingerprint: str
    dtype: str
    modules: tuple[PackedModule, ...]
    peft_config: dict
    data_offset: int

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules), default=0)

    @property
    def target_modules(self) -> list[str]:
        return sorted({m.name.rsplit(".", 1)[-1] for m in self.modules})


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def pack(
    modules: Mapping[str, ModuleWeights],
    *,
    base_fingerprint: str,
    peft_config: dict | None = None,
    dtype: torch.dtype | None = None,
) -> bytes:
    """Pack module weights into one buffer. All tensors are stored in one dtype."""
    if not modules:
        raise InvalidAdapter("adapter has no LoRA modules")
    names = sorted(modules)
    dtype = dtype or modules[names[0]].A.dtype
    if dtype not in DTYPE_NAMES:
        raise InvalidAdapter(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
    esize = torch.empty((), dtype=dtype).element_size()
    entries = []
    tensors: list[tuple[int, torch.Tensor]] = []
    off = 0
    for name in names:
        mw = modules[name]
        r, fin = mw.A.shape
        fout, rb = mw.B.shape
        if rb != r:
            raise InvalidAdapter(f"module {name}: lora_A rank {r} != lora_B rank {rb}")
        a_off = off
        off = _align(off + r * fin * esize)
        b_off = off
        off = _align(off + fout * r * esize)
        entries.append(
            {
                "name": name,
                "rank": int(r),
                "in": int(fin),
                "out": int(fout),
                "alpha": float(mw.alpha),
                "scale": float(mw.scale),
                "a": a_off,
                "b": b_off,
            }
        )
        tensors.append((a_off, mw.A))
        tensors.append((b_off, mw.B))
    header = {
        "format": FORMAT_VERSION,
        "base_fingerprint": base_fingerprint,
        "dtype": DTYPE_NAMES[dtype],
        "modules": entries,
        "peft": peft_config or {},
    }
    hbytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    data_offset = _align(_PREFIX.size + len(hbytes))
    buf = bytearray(data_offset + off)
    _PREFIX.pack_into(buf, 0, MAGIC, len(hbytes))
    buf[_PREFIX.size : _PREFIX.size + len(hbytes)] = hbytes
    for t_off, t in tensors:
        raw = t.detach().to(device="cpu", dtype=dtype).contiguous().view(torch.uint8).numpy()
        start = data_offset + t_off
        buf[start : start + raw.nbytes] = raw.tobytes()
    return bytes(buf)


def read_header(buf: bytes | memoryview) -> PackedHeader:
    mv = memoryview(buf)
    if len(mv) < _PREFIX.size:
        raise InvalidAdapter(f"packed adapter is {len(mv)} bytes, shorter than its prefix")
    magic, hlen = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise InvalidAdapter(f"packed adapter has magic {bytes(magic)!r}, expected {MAGIC!r}")
    end = _PREFIX.size + hlen
    if end > len(mv):
        raise InvalidAdapter(f"packed adapter header of {hlen} bytes runs past the buffer")
    try:
        h = json.loads(bytes(mv[_PREFIX.size : end]))
    except ValueError as e:
        raise InvalidAdapter(f"packed adapter header is not JSON: {e}") from e
    if h.get("format") != FORMAT_VERSION:
        raise InvalidAdapter(f"packed adapter format {h.get('format')!r} is not supported")
    if h.get("dtype") not in DTYPES:
        raise InvalidAdapter(f"packed adapter dtype {h.get('dtype')!r} is not supported")
    mods = tuple(
        PackedModule(
            name=m["name"],
            rank=m["rank"],
            in_features=m["in"],
            out_features=m["out"],
            alpha=m["alpha"],
            scale=m["scale"],
            a_offset=m["a"],
            b_offset=m["b"],
        )
        for m in h["modules"]
    )
    data_offset = _align(end)
    esize = torch.empty((), dtype=DTYPES[h["dtype"]]).element_size()
    for m in mods:
        last = data_offset + m.b_offset + m.out_features * m.rank * esize
        if last > len(mv):
            raise InvalidAdapter(f"packed adapter is truncated: module {m.name} ends at {last}")
    return PackedHeader(
        format_version=h["format"],
        base_fingerprint=h["base_fingerprint"],
        dtype=h["dtype"],
        modules=mods,
        peft_config=h.get("peft", {}),
        data_offset=data_offset,
    )


def unpack(
    buf: bytes | bytearray | memoryview, *, copy: bool = False
) -> tuple[PackedHeader, dict[str, ModuleWeights]]:
    """Tensors that view buf (zero-copy) unless copy=True; read-only buffers warn-free via copy."""
    header = read_header(buf)
    dtype = DTYPES[header.dtype]
    esize = torch.empty((), dtype=dtype).element_size()
    mv = memoryview(buf)
    if copy or mv.readonly:
        # torch.frombuffer needs a writable buffer; a read-only one (an LMDB page, bytes) is
        # copied once, whole, into a fresh bytearray.
        mv = memoryview(bytearray(mv))
    out: dict[str, ModuleWeights] = {}
    for m in header.modules:
        a = torch.frombuffer(
            mv, dtype=dtype, count=m.rank * m.in_features, offset=header.data_offset + m.a_offset
        ).view(m.rank, m.in_features)
        b = torch.frombuffer(
            mv, dtype=dtype, count=m.out_features * m.rank, offset=header.data_offset + m.b_offset
        ).view(m.out_features, m.rank)
        out[m.name] = ModuleWeights(A=a, B=b, alpha=m.alpha, scale=m.scale)
    del esize
    return header, out


def digest(buf: bytes | memoryview) -> str:
    return hashlib.sha256(buf).hexdigest()
