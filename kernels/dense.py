"""The backbone's dense (base) linear layers on the CPU: oneDNN with weights packed once.

Every step of the executor runs the base model's Linears (q/k/v/o, the MLP and the LM head) on
the step's rows, and on a CPU that is most of the step: the LoRA ops add a few percent on top.
torch's nn.Linear on the CPU calls MKL's sgemm with the weight as stored; oneDNN with the weight
reordered once, at load, into its blocked layout (what torch.compile's CPU freezing pass and
vLLM's CPU backend do) measured 1.1-1.3x faster at decode batches of 32-64 rows, ~2-3x at 1-8
rows and ~1.1x at prefill chunks of 512 rows on the 2-core AVX2 build machine
(`mint bench kernels` reports the step-level gain as dense_decode_speedup).

- PackedLinear(linear, batch_hint): y = x @ W^T + b with W packed (oneDNN's own tensor, not a
  Parameter: the engine only runs inference); `weight` gives a dense copy back.
- select_dense(device, dtype, mode): "onednn" or "torch" ("auto": oneDNN on CPU float32 when
  torch has it and a probe matches F.linear; anything else keeps nn.Linear, one warning if the
  probe fails). The packed path needs fp32 here: oneDNN's bf16/fp16 weight packing requires
  AVX-512/AVX-NE-CONVERT, which this CPU lacks.
- pack_linears(model, batch_hint): replace every nn.Linear of the model (including the base
  layers inside the multi-LoRA wrappers) by a PackedLinear, except one whose weight is tied to
  another module's (an LM head sharing the embedding matrix would be held twice); returns how
  many.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

DENSE_MODES = ("auto", "onednn", "torch")

_probe_lock = threading.Lock()
_probe: dict[str, str | None] = {}  # "cpu" -> None (works) or why it does not
_warned: set[str] = set()  # failed probes already logged


def _ops_present() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def _pack(weight: torch.Tensor, batch_hint: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), max(1, int(batch_hint)))


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _probe_cpu() -> str | None:
    """None if oneDNN's packed fp32 linear runs here and matches F.linear, else why not."""
    with _probe_lock:
        if "cpu" not in _probe:
            _probe["cpu"] = _run_probe()
        return _probe["cpu"]


# The probe's cases (rows, out, in, |x|, |w|): odd and real-model-like shapes, one row (decode)
# to prefill-sized, activations and weights far from N(0, 1).
_PROBE_CASES = ((5, 37, 53, 1.0, 1.0), (1, 96, 64, 1e3, 1e-3), (64, 17, 33, 30.0, 50.0),
                (33, 128, 72, 1e-4, 1.0))  # fmt: skip


def _run_probe() -> str | None:
    """The start-up self-check of the packed Linear: each case against F.linear in float64,
    relative to the size of the terms summed."""
    if not _ops_present():
        return "this torch build has no oneDNN (mkldnn) linear ops"
    try:
        g = torch.Generator().manual_seed(0)
        for rows, out_f, in_f, xm, wm in _PROBE_CASES:
            w = torch.randn(out_f, in_f, generator=g) * wm
            b = torch.randn(out_f, generator=g) * wm
            x = torch.randn(rows, in_f, generator=g) * xm
            with torch.inference_mode():
                got = _linear(x, _pack(w, 8), b)
            want = F.linear(x.double(), w.double(), b.double())
            bound = 1e-5 * (x.abs().double() @ w.abs().double().T + b.abs().double()) + 1e-30
            if got.shape != want.shape or not bool(((got.double() - want).abs() <= bound).all()):
                return (
                    "the packed oneDNN linear does not match F.linear on this machine "
                    f"({rows} rows, {out_f}x{in_f}, |x| ~ {xm}, |w| ~ {wm})"
                )
    except Exception as e:  # noqa: BLE001 - any failure means: keep nn.Linear
        return f"the packed oneDNN linear failed: {type(e).__name__}: {e}"
    return None


def select_dense(device: torch.device | str, dtype: torch.dtype, mode: str = "auto") -> str:
    """The implementation of the backbone's Linears: "onednn" or "torch".

    mode "torch" keeps nn.Linear; "onednn" requires the packed path (ValueError naming why it
    cannot serve this device/dtype); "auto" takes it where it serves, else nn.Linear."""
    if mode not in DENSE_MODES:
        raise ValueError(f"dense kernels {mode!r}: use one of {', '.join(DENSE_MODES)}")
    if mode == "torch":
        return "torch"
    device = torch.device(device)
    why: str | None
    if device.type != "cpu":
        why = f"the packed oneDNN linear is a CPU path (device is {device})"
    elif dtype != torch.float32:
        why = f"the packed oneDNN linear serves float32 here (dtype is {dtype})"
    else:
        why = _probe_cpu()
        if why is not None and mode == "auto":
            # Expected to work here and did not: say so once (other cases are simply not its
            # job).
            with _probe_lock:
                first = why not in _warned
                _warned.add(why)
            if first:
                logger.warning("dense kernels: %s; the backbone keeps torch's nn.Linear", why)
    if why is None:
        return "onednn"
    if mode == "onednn":
        raise ValueError(f"dense kernels 'onednn': {why}")
    return "torch"


# A training pass that shares the model with serving (services/executor/training.py's slicer)
# gives the model back between layers; one backbone GEMM can still be longer than its slice
# (the LM head: 64 rows x 32000 x 1024 is ~60 ms forward and backward on a 2-core CPU). While
# yield points are set on this thread (yield_points()) and say serving is waiting, a packed
# Linear's training forward and backward run in pieces of rows of at most piece_macs
# multiply-adds (2^28, ~8 ms at this CPU's GEMM peak), with a yield point between two pieces,
# and the backward unpacks its weight with the model let go (the packed weight is immutable;
# serving reads it meanwhile).
_points = threading.local()


class YieldPoints:
    """What a sliced training pass offers the packed Linears: busy() (is serving waiting),
    point() (a yield point: may let a serving step run), unlocked(fn) (fn() run with the model
    let go; its result) and piece_macs (the most multiply-adds between two yield points)."""

    piece_macs: int = 1 << 28

    def busy(self) -> bool:
        return False

    def point(self) -> None:
        return None

    def unlocked(self, fn):
        return fn()


class yield_points:  # noqa: N801 - a context manager used as a function
    """Within: the packed Linears of this thread yield through `points` (in pieces of rows
    of at most points.piece_macs multiply-adds while points.busy())."""

    def __init__(self, points: YieldPoints) -> None:
        self.points = points

    def __enter__(self) -> YieldPoints:
        self.prev = getattr(_points, "current", None)
        _points.current = self.points
        return self.points

    def __exit__(self, *exc) -> None:
        _points.current = self.prev


def _pieces(rows: int, macs_per_row: int) -> int:
    """Rows per piece, or 0 for no pieces (no yield points here, or nothing waiting)."""
    pts = getattr(_points, "current", None)
    if pts is None or rows * macs_per_row <= pts.piece_macs or not pts.busy():
        return 0
    return max(1, pts.piece_macs // macs_per_row)


def _in_pieces(x: torch.Tensor, step: int, fn) -> torch.Tensor:
    """fn over row pieces of x (flattened to 2-D) of `step` rows, a yield point between two."""
    pts = _points.current
    x2 = x.reshape(-1, x.shape[-1])
    outs = []
    for i in range(0, x2.shape[0], step):
        if i:
            pts.point()
        outs.append(fn(x2[i : i + step]))
    out = torch.cat(outs)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class _PackedLinearFn(torch.autograd.Function):
    """The packed forward with a backward for the input only (the backbone never trains): dX =
    dY W, with W unpacked for the call (one layer's weight at a time, dropped after it, so
    training on the resident backbone holds no second copy of it). Both in pieces of rows
    while yield points say serving waits (YieldPoints.piece_macs): each row's output as in one
    call, up to the GEMM's rounding for another row count."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        rows = x.numel() // max(1, x.shape[-1])
        step = _pieces(rows, module.in_features * module.out_features)
        if step:
            return _in_pieces(x, step, lambda xs: _linear(xs, module.packed, module.bias))
        return _linear(x, module.packed, module.bias)

    @staticmethod
    def backward(ctx, grad):
        m = ctx.module
        rows = grad.numel() // max(1, grad.shape[-1])
        step = _pieces(rows, m.in_features * m.out_features)
        if not step:
            return grad @ m.packed.to_dense(), None
        w = _points.current.unlocked(m.packed.to_dense)
        return _in_pieces(grad, step, lambda gs: gs @ w), None


class PackedLinear(nn.Module):
    """An nn.Linear with its weight packed for oneDNN once (CPU, float32); frozen: it passes
    gradients to its input (for the LoRA layers below it) but has none of its own."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 32) -> None:
        super().__init__()
        w = linear.weight
        if w.device.type != "cpu" or w.dtype != torch.float32:
            raise ValueError(
                f"PackedLinear needs a CPU float32 weight, got {w.dtype} on {w.device}"
            )
        self.in_features = int(linear.in_features)
        self.out_features = int(linear.out_features)
        # Plain attributes, not parameters/buffers: an opaque oneDNN tensor is not state_dict
        # material, and the engine never trains or moves the backbone after loading it.
        self.packed = _pack(w, batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy of the weight [out, in] (for inspection; the forward never uses it)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise TypeError(f"PackedLinear takes CPU float32 input, got {x.dtype} on {x.device}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            # oneDNN's own error is cryptic, and an empty x of any width passed silently.
            raise ValueError(
                f"x {list(x.shape)} does not fit PackedLinear with in_features {self.in_features}"
            )
        if x.requires_grad and torch.is_grad_enabled():
            return _PackedLinearFn.apply(x, self)
        return _linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, onednn"
        )


def pack_linears(model: nn.Module, batch_hint: int = 32) -> int:
    """Replace every nn.Linear in `model` by a PackedLinear, in place; returns how many.

    batch_hint: the rows per call oneDNN lays the weight out for (the engine passes its
    sequence budget, the decode step's rows); any row count is still correct."""
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    # A weight tied to another module (tie_word_embeddings: the LM head is the embedding
    # matrix) stays as it is: a packed copy would hold vocab x hidden twice.
    others = {
        p.untyped_storage().data_ptr()
        for m in model.modules()
        if type(m) is not nn.Linear
        for p in m.parameters(recurse=False)
    }
    found = [(n, m) for n, m in linears if m.weight.untyped_storage().data_ptr() not in others]
    for name, mod in found:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, PackedLinear(mod, batch_hint))
    if found:
        _release_checkpoint_mapping(model)
    return len(found)


def _release_checkpoint_mapping(model: nn.Module) -> None:
    """Copy the model's remaining tensors (embeddings, norms, buffers) into memory of their own.

    A safetensors checkpoint is memory-mapped: the packed weights are new memory, and the file
    mapping, with every page of the original weights that packing read, stays mapped while any
    tensor of the model still lives in it (on the small backbone: 1.49 GB resident after packing
    instead of 1.09 GB). The copies are small next to the Linears."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
        for mod in model.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None:
                    mod._buffers[name] = buf.clone()
