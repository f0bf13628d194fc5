"""Per-forward batch metadata: built once in prepare(), read by every LoRA layer of the forward.

From token_slots [T] (the pool slot of each token row, -1 = no adapter) prepare() derives:

- sorted_tokens [T] int64: token rows sorted by slot (stable), rows with an adapter first;
- seg_starts [S+1] int32, seg_slots [S] int32, num_segs [1] int32: the segments of sorted_tokens
  that share one adapter (SGMV), S = number of distinct adapters in the batch;
- on the host: the same segments and the runs of equal slots in the original row order, as
  Python ints (the CPU path loops over them with zero-copy views).

The per-adapter rank and page list live in the pool (ranks[layer, slot], page_table[slot]);
kernels reach them through the segment's (or row's) slot.

Buffers are preallocated (make(max_tokens=...)) and grow geometrically when a batch is larger,
so steady-state prepare() allocates nothing on the device and addresses stay stable for CUDA
graph capture. Device mirrors are filled once per prepare() on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch


class MetaTensors(NamedTuple):
    """The metadata tensors a kernel reads, all on the kernel's device (views of buffers)."""

    token_slots: torch.Tensor  # [T] int64, -1 = no adapter
    sorted_tokens: torch.Tensor  # [T] int64, rows with an adapter first, grouped by slot
    seg_starts: torch.Tensor  # [S_cap + 1] int32, valid up to num_segs
    seg_slots: torch.Tensor  # [S_cap] int32
    num_segs: torch.Tensor  # [1] int32


@dataclass
class HostMeta:
    """The same metadata as Python ints, for host-side planning (CPU path, grid sizes)."""

    num_tokens: int = 0
    num_active: int = 0  # rows with an adapter
    run_sizes: list[int] = field(default_factory=list)  # every run, in row order (splits x)
    run_slots: list[int] = field(default_factory=list)  # slot of each run (-1 included)
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, slot)
    max_seg_len: int = 0
    # Plans computed from this metadata by a backend, keyed by whatever they depend on.
    plans: dict[Any, Any] = field(default_factory=dict)

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def num_active_runs(self) -> int:
        return sum(1 for s in self.run_slots if s >= 0)


def norm_device(device: str | torch.device) -> torch.device:
    """torch.device with the index filled in for CUDA ("cuda" -> "cuda:N", the current one), so
    that it compares equal to the device of the tensors created on it."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _grow(buf: torch.Tensor | None, n: int, dtype: torch.dtype, device: torch.device):
    if buf is not None and buf.numel() >= n and buf.device == device:
        return buf
    cap = max(16, 1 << max(0, (n - 1)).bit_length())
    return torch.empty(cap, dtype=dtype, device=device)


class BatchMeta:
    """Per-forward metadata; make() once, prepare(token_slots) once per forward."""

    def __init__(self, max_tokens: int = 0, device: str | torch.device | None = None) -> None:
        self._cpu: dict[str, torch.Tensor | None] = dict.fromkeys(
            ("token_slots", "sorted_tokens", "seg_starts", "seg_slots", "num_segs")
        )
        self._dev: dict[torch.device, dict[str, torch.Tensor | None]] = {}
        self._dev_ready: set[torch.device] = set()
        # tensors()'s answer per device until the next prepare() (or a buffer grows): one
        # forward asks once per LoRA layer (~5 us of slicing each, ~1% of a decode step).
        self._views: dict[torch.device, MetaTensors] = {}
        self.host = HostMeta()
        self.num_tokens = 0
        self._prepared = False
        if max_tokens:
            self._reserve(int(max_tokens), norm_device(device) if device else None)

    @classmethod
    def make(cls, max_tokens: int = 0, device: str | torch.device | None = None) -> BatchMeta:
        """Preallocate buffers for up to max_tokens rows (they grow if a batch is larger)."""
        return cls(max_tokens=max_tokens, device=device)

    def _reserve(self, n: int, device: torch.device | None) -> None:
        self._views = {}  # every prepare() comes here: tensors() answers afresh after it
        cpu = torch.device("cpu")
        specs = {
            "token_slots": (n, torch.int64),
            "sorted_tokens": (n, torch.int64),
            "seg_starts": (n + 1, torch.int32),
            "seg_slots": (max(n, 1), torch.int32),
            "num_segs": (1, torch.int32),
        }
        for name, (size, dt) in specs.items():
            self._cpu[name] = _grow(self._cpu[name], size, dt, cpu)
        if device is not None and device.type != "cpu":
            d = self._dev.setdefault(device, dict.fromkeys(specs))
            for name, (size, dt) in specs.items():
                d[name] = _grow(d[name], size, dt, device)

    # ---- building ------------------------------------------------------------------------

    def prepare(
        self, token_slots: torch.Tensor, *, device: str | torch.device | None = None
    ) -> BatchMeta:
        """Build the metadata of one forward from the slot of every token row (-1 = none).

        token_slots: [T] integer tensor (any device; one host copy if it is on an accelerator).
        device: where the kernels will run (default: token_slots' device)."""
        if token_slots.dim() != 1:
            raise ValueError(f"token_slots must be 1-D, got shape {list(token_slots.shape)}")
        if token_slots.dtype.is_floating_point or token_slots.dtype == torch.bool:
            raise ValueError(f"token_slots must be an integer tensor, got {token_slots.dtype}")
        dev = norm_device(device) if device is not None else token_slots.device
        ts = token_slots.detach().to("cpu", torch.int64)
        T = int(ts.numel())
        if T and int(ts.min()) < -1:
            raise ValueError(f"token_slots has slot {int(ts.min())}; use -1 for no adapter")
        self._reserve(max(T, 1), dev)
        c = self._cpu
        c["token_slots"][:T].copy_(ts)
        host = HostMeta(num_tokens=T)
        n_seg = 0
        if T:
            # Runs of equal slots in row order (prefill: one run per request).
            r_slots, r_lens = torch.unique_consecutive(ts, return_counts=True)
            host.run_slots = r_slots.tolist()
            host.run_sizes = r_lens.tolist()
            # Rows sorted by slot, rows without adapter last.
            key = torch.where(ts < 0, torch.iinfo(torch.int64).max, ts)
            order = torch.argsort(key, stable=True)
            c["sorted_tokens"][:T].copy_(order)
            s_slots, s_lens = torch.unique_consecutive(ts[order], return_counts=True)
            start = 0
            for s, n in zip(s_slots.tolist(), s_lens.tolist(), strict=True):
                if s >= 0:
                    host.segments.append((start, start + n, s))
                start += n
            n_seg = len(host.segments)
            host.num_active = host.segments[-1][1] if n_seg else 0
            host.max_seg_len = max((e - s for s, e, _ in host.segments), default=0)
            if n_seg:
                bounds = [s for s, _, _ in host.segments] + [host.num_active]
                c["seg_starts"][: n_seg + 1].copy_(torch.tensor(bounds, dtype=torch.int32))
                c["seg_slots"][:n_seg].copy_(
                    torch.tensor([s for _, _, s in host.segments], dtype=torch.int32)
                )
        c["num_segs"][0] = n_seg
        self.host = host
        self.num_tokens = T
        self.device = dev
        self._dev_ready = set()
        self._prepared = True
        return self

    # ---- reading -------------------------------------------------------------------------

    @property
    def token_slots(self) -> torch.Tensor:
        return self.tensors(torch.device("cpu")).token_slots

    @property
    def segments(self) -> list[tuple[int, int, int]]:
        return self.host.segments

    def tensors(self, device: str | torch.device | None = None) -> MetaTensors:
        """The metadata tensors on `device` (default: the prepare() device), views of the
        preallocated buffers; copied to an accelerator once per prepare()."""
        if not self._prepared:
            raise RuntimeError("BatchMeta.prepare() was not called")
        dev = norm_device(device) if device is not None else self.device
        got = self._views.get(dev)
        if got is not None:
            return got
        T = self.num_tokens
        if dev.type == "cpu":
            src = self._cpu
        else:
            if dev not in self._dev:
                self._reserve(max(T, 1), dev)
            src = self._dev[dev]
            if dev not in self._dev_ready:
                for name, buf in self._cpu.items():
                    assert buf is not None
                    dst = src[name]
                    if dst is None or dst.numel() < buf.numel():
                        self._reserve(buf.numel(), dev)
                        dst = src[name]
                    assert dst is not None
                    dst[: buf.numel()].copy_(buf, non_blocking=True)
                self._dev_ready.add(dev)
        s_cap = max(T, 1)
        got = MetaTensors(
            token_slots=src["token_slots"][:T],
            sorted_tokens=src["sorted_tokens"][:T],
            seg_starts=src["seg_starts"][: s_cap + 1],
            seg_slots=src["seg_slots"][:s_cap],
            num_segs=src["num_segs"][:1],
        )
        self._views[dev] = got
        return got


def host_from_tensors(md: MetaTensors) -> HostMeta:
    """Rebuild the host metadata from the tensors (the path a custom op takes: it only gets
    tensors). One device->host copy of token_slots when they live on an accelerator."""
    ts = md.token_slots.detach().to("cpu", torch.int64)
    T = int(ts.numel())
    host = HostMeta(num_tokens=T)
    if not T:
        return host
    r_slots, r_lens = torch.unique_consecutive(ts, return_counts=True)
    host.run_slots = r_slots.tolist()
    host.run_sizes = r_lens.tolist()
    n_seg = int(md.num_segs.reshape(-1)[0])
    if n_seg:
        starts = md.seg_starts[: n_seg + 1].tolist()
        slots = md.seg_slots[:n_seg].tolist()
        host.segments = [(starts[i], starts[i + 1], slots[i]) for i in range(n_seg)]
        host.num_active = starts[n_seg]
        host.max_seg_len = max(e - s for s, e, _ in host.segments)
    return host
