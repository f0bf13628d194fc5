"""The packed adapter format: one contiguous buffer per adapter revision.

Layout (little-endian):

    b"MINTPAK1" | u32 header_len | header (canonical JSON, utf-8) | zero pad to 64
    | tensor data: for each module (sorted by name) A [rank, in] then B^T [rank, out]
      (format 2; format 1 stored B [out, rank]), each starting on a 64-byte boundary

Offsets in the header are relative to the start of the tensor data. One read and one
host-to-device copy load a whole adapter; the sha256 of the buffer is the revision's digest.

Storage formats: float32, float16 and bfloat16 store A and B as they are (header "dtype"). An
"int8" pack stores each matrix as int8 with one float32 scale per row (symmetric,
scale = max|row| / 127), the scales right after their matrix (module keys "as" / "bs", also
64-byte aligned); `unpack` dequantizes it to a float dtype (float32 unless asked otherwise).

Format 2 stores a float pack's B transposed, row-major [rank, out]: the device pool keeps B^T
rows, so loading a module is two contiguous copies (a transposing copy of B cost ~30 us per
module on the CPU, half of a 4 MiB adapter's load time). int8 packs keep B's per-row layout
(they are dequantized into fresh tensors anyway). Packs of format 1 stay readable; their
digests are unchanged (a digest is the sha256 of the stored bytes), but packing the same
weights now gives a format-2 buffer and so a different digest than before.
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
FORMAT_VERSION = 2
# Formats unpack reads: 1 (B stored [out, rank]) and 2 (float B stored as B^T [rank, out]).
READABLE_FORMATS = (1, 2)
ALIGN = 64
_PREFIX = struct.Struct("<8sI")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INT8 = "int8"
# Every storage format a pack may have: the float dtypes, then int8 (per-row scales).
STORAGE_FORMATS: tuple[str, ...] = ("float32", "bfloat16", "float16", INT8)
# Short names the CLI accepts.
STORAGE_ALIASES = {
    "fp32": "float32",
    "f32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "i8": INT8,
}
INT8_MAX = 127


def storage_format(name: str) -> str:
    """The canonical storage format of name ("bf16" -> "bfloat16"); ValueError names it."""
    fmt = STORAGE_ALIASES.get(name.lower(), name.lower())
    if fmt not in STORAGE_FORMATS:
        raise ValueError(
            f"storage format {name!r} is not supported; use one of {list(STORAGE_FORMATS)}"
        )
    return fmt


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q [rows, cols] int8, scales [rows] float32) with
    t ~= q * scales[:, None]. A row of zeros gets scale 1 (and stays zero)."""
    x = t.detach().to(device="cpu", dtype=torch.float32)
    scales = x.abs().amax(dim=1) / INT8_MAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(x / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scales.contiguous()


def dequantize_rows(
    q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Semantics: out[i, j] = q[i, j] * scales[i]; q: [rows, cols] int8, scales: [rows]."""
    return (q.to(torch.float32) * scales.to(torch.float32)[:, None]).to(dtype)


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
    # int8 packs: offsets of the float32 per-row scales of A and B (-1 for float packs).
    a_scale_offset: int = -1
    b_scale_offset: int = -1


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

    @property
    def storage_format(self) -> str:
        """float32 | bfloat16 | float16 | int8 (the header's "dtype")."""
        return self.dtype

    @property
    def quantized(self) -> bool:
        return self.dtype == INT8


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class PackLayout:
    """A pack planned (pack_layout) and not yet written: its size, and write_into(buf) writes
    it into any writable buffer of that size (pack() into fresh bytes; an executor into its
    host tier directly)."""

    size: int
    data_offset: int
    header: bytes
    dtype: torch.dtype | None  # None: int8
    esize: int
    tensors: tuple[tuple[int, torch.Tensor], ...]

    def write_into(self, buf: bytearray | memoryview) -> None:
        if len(buf) != self.size:
            raise ValueError(f"a buffer of {len(buf)} bytes for a pack of {self.size}")
        buf[: self.data_offset] = bytes(self.data_offset)
        _PREFIX.pack_into(buf, 0, MAGIC, len(self.header))
        buf[_PREFIX.size : _PREFIX.size + len(self.header)] = self.header
        region = torch.frombuffer(buf, dtype=torch.uint8)
        end = self.data_offset
        for t_off, t in self.tensors:
            start = self.data_offset + t_off
            if start > end:  # alignment padding: zeros, whatever the buffer held
                region[end:start].zero_()
            if self.dtype is None:  # int8 data or float32 scales, as they are
                raw = t.contiguous().view(torch.uint8).reshape(-1)
                region[start : start + raw.numel()].copy_(raw)
                end = start + raw.numel()
                continue
            # Converted (and B transposed) by one copy; every offset is aligned, so the region
            # views as the storage dtype.
            n = t.numel() * self.esize
            region[start : start + n].view(self.dtype).view(t.shape).copy_(t.detach())
            end = start + n
        if end < self.size:
            region[end:].zero_()


def pack(
    modules: Mapping[str, ModuleWeights],
    *,
    base_fingerprint: str,
    peft_config: dict | None = None,
    dtype: torch.dtype | None = None,
    storage: str | None = None,
) -> bytes:
    """Pack module weights into one buffer. All tensors are stored in one dtype: `dtype`, or
    the storage format `storage` (float32 | bfloat16 | float16 | int8), default A's dtype."""
    layout = pack_layout(
        modules,
        base_fingerprint=base_fingerprint,
        peft_config=peft_config,
        dtype=dtype,
        storage=storage,
    )
    buf = bytearray(layout.size)
    layout.write_into(buf)
    return bytes(buf)


def pack_layout(
    modules: Mapping[str, ModuleWeights],
    *,
    base_fingerprint: str,
    peft_config: dict | None = None,
    dtype: torch.dtype | None = None,
    storage: str | None = None,
) -> PackLayout:
    """What pack() writes, planned: the header, the offsets, the tensors (int8: quantized)."""
    if not modules:
        raise InvalidAdapter("adapter has no LoRA modules")
    names = sorted(modules)
    if storage is not None:
        try:
            storage = storage_format(storage)
        except ValueError as e:
            raise InvalidAdapter(str(e)) from None
        if dtype is not None:
            raise ValueError("pass dtype or storage, not both")
    quantized = storage == INT8
    if not quantized:
        dtype = DTYPES[storage] if storage is not None else (dtype or modules[names[0]].A.dtype)
        if dtype not in DTYPE_NAMES:
            raise InvalidAdapter(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
        esize = torch.empty((), dtype=dtype).element_size()
    else:
        esize = 1
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
        entry = {
            "name": name,
            "rank": int(r),
            "in": int(fin),
            "out": int(fout),
            "alpha": float(mw.alpha),
            "scale": float(mw.scale),
            "a": a_off,
        }
        if quantized:
            qa, sa = quantize_rows(mw.A)
            entry["as"] = off
            tensors.append((off, sa))
            off = _align(off + r * 4)
            b_off = off
            off = _align(off + fout * r)
            qb, sb = quantize_rows(mw.B)
            entry["bs"] = off
            tensors.append((off, sb))
            off = _align(off + fout * 4)
            tensors.append((a_off, qa))
            tensors.append((b_off, qb))
        else:
            b_off = off
            off = _align(off + fout * r * esize)
            tensors.append((a_off, mw.A))
            tensors.append((b_off, mw.B.t()))  # B^T [r, out]: the pool's layout
        entry["b"] = b_off
        entries.append(entry)
    header = {
        "format": FORMAT_VERSION,
        "base_fingerprint": base_fingerprint,
        "dtype": INT8 if quantized else DTYPE_NAMES[dtype],
        "modules": entries,
        "peft": peft_config or {},
    }
    hbytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    data_offset = _align(_PREFIX.size + len(hbytes))
    return PackLayout(
        size=data_offset + off,
        data_offset=data_offset,
        header=hbytes,
        dtype=None if quantized else dtype,
        esize=esize,
        tensors=tuple(sorted(tensors, key=lambda x: x[0])),
    )


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
    if h.get("format") not in READABLE_FORMATS:
        raise InvalidAdapter(f"packed adapter format {h.get('format')!r} is not supported")
    quantized = h.get("dtype") == INT8
    if h.get("dtype") not in DTYPES and not quantized:
        raise InvalidAdapter(f"packed adapter dtype {h.get('dtype')!r} is not supported")
    try:
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
                a_scale_offset=m["as"] if quantized else -1,
                b_scale_offset=m["bs"] if quantized else -1,
            )
            for m in h["modules"]
        )
    except (KeyError, TypeError) as e:
        raise InvalidAdapter(f"packed adapter header lacks module field {e}") from None
    data_offset = _align(end)
    esize = 1 if quantized else torch.empty((), dtype=DTYPES[h["dtype"]]).element_size()
    for m in mods:
        last = data_offset + m.b_offset + m.out_features * m.rank * esize
        if quantized:
            last = max(
                last,
                data_offset + m.a_scale_offset + 4 * m.rank,
                data_offset + m.b_scale_offset + 4 * m.out_features,
            )
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
    buf: bytes | bytearray | memoryview,
    *,
    copy: bool = False,
    dequantize_to: torch.dtype = torch.float32,
) -> tuple[PackedHeader, dict[str, ModuleWeights]]:
    """Tensors that view buf (zero-copy) unless copy=True; read-only buffers warn-free via copy.
    An int8 pack is dequantized into fresh tensors of dtype `dequantize_to`."""
    header = read_header(buf)
    if header.quantized:
        return header, _unpack_int8(buf, header, dequantize_to)
    dtype = DTYPES[header.dtype]
    bt = header.format_version >= 2
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
        )
        # Format 2 stores B^T: B is its transposed (non-contiguous) view.
        b = b.view(m.rank, m.out_features).t() if bt else b.view(m.out_features, m.rank)
        out[m.name] = ModuleWeights(A=a, B=b, alpha=m.alpha, scale=m.scale)
    return header, out


def _unpack_int8(
    buf: bytes | bytearray | memoryview, header: PackedHeader, dtype: torch.dtype
) -> dict[str, ModuleWeights]:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dequantize_to {dtype} must be one of {sorted(DTYPES)}")
    mv = memoryview(bytearray(buf))  # one copy; the results are fresh tensors anyway
    base = header.data_offset
    out: dict[str, ModuleWeights] = {}
    for m in header.modules:
        qa = torch.frombuffer(
            mv, dtype=torch.int8, count=m.rank * m.in_features, offset=base + m.a_offset
        ).view(m.rank, m.in_features)
        sa = torch.frombuffer(mv, dtype=torch.float32, count=m.rank, offset=base + m.a_scale_offset)
        qb = torch.frombuffer(
            mv, dtype=torch.int8, count=m.out_features * m.rank, offset=base + m.b_offset
        ).view(m.out_features, m.rank)
        sb = torch.frombuffer(
            mv, dtype=torch.float32, count=m.out_features, offset=base + m.b_scale_offset
        )
        out[m.name] = ModuleWeights(
            A=dequantize_rows(qa, sa, dtype),
            B=dequantize_rows(qb, sb, dtype),
            alpha=m.alpha,
            scale=m.scale,
        )
    return out


def digest(buf: bytes | memoryview) -> str:
    return hashlib.sha256(buf).hexdigest()
