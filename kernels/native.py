"""Native CPU LoRA ops (fp32): lora_cpu.cpp, built on first use with the system C++ compiler.

The library has a plain C ABI (no torch headers, no ninja: one g++ call of a couple of seconds)
and is loaded with ctypes. It is cached per machine under the torch extensions directory
($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), keyed by the source, the flags and the
compiler, so a process normally only dlopens it. Where no compiler works, one warning is logged
and the CPU backend keeps its torch strategies (--no-native-kernels turns the library off).

load(block=False) never compiles on the calling thread: without a cached build it starts one in
the background and returns None until it is ready (the torch path serves meanwhile).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from mintmesh.kernels.meta import MetaTensors
from mintmesh.kernels.pool import LayerWeights
from mintmesh.kernels.settings import SETTINGS

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_cpu.cpp")
# The helper threads both libraries share their work with (included by both sources).
SHARE_HEADER = Path(__file__).with_name("work_share.h")
ABI_VERSION = 1
_BASE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-Wno-psabi", "-fno-math-errno"]
_F32 = torch.float32
_VP, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def build_dir() -> Path:
    """Where builds are cached: torch's extensions directory (as torch.utils.cpp_extension)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        try:
            from torch import _appdirs

            root = _appdirs.user_cache_dir(appname="torch_extensions")
        except Exception:  # noqa: BLE001 - a private module: fall back to its usual answer
            root = str(Path.home() / ".cache" / "torch_extensions")
    return Path(root) / "mintmesh_lora_cpu"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _lib_path(
    cxx: str, src: bytes, name: str = "lora_cpu", abi: int = ABI_VERSION, flags: str = ""
) -> Path:
    ver = _run([cxx, "--version"], timeout=30)
    key = hashlib.sha256()
    for part in (src, " ".join(_BASE_FLAGS).encode(), cxx.encode(), ver.stdout.encode(),
                 platform.machine().encode(), str(abi).encode()):  # fmt: skip
        key.update(part)
        key.update(b"\0")
    if flags:
        key.update(flags.encode())
    return build_dir() / f"{name}_{key.hexdigest()[:16]}.so"


def _compile(
    cxx: str, src_path: Path, out: Path, variants: tuple[list[str], ...] = (["-pthread"], [])
) -> None:
    """Compile to a temporary file, then rename it into place (atomic: concurrent builders and
    readers never see a partial library). variants: the extra flags to try, in order."""
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in variants:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            # -I: the shared header is found beside this module, wherever the source is.
            inc = ["-I", str(SHARE_HEADER.parent)]
            r = _run([cxx, *_BASE_FLAGS, *inc, *extra, str(src_path), "-o", tmp])
            if r.returncode == 0:
                os.replace(tmp, out)
                return
            errors.append(r.stderr.strip()[-2000:])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{cxx} failed: {errors[-1] if errors else '?'}")


class NativeLib:
    """The loaded library: fp32 fused / shrink / expand over the paged pool, one call each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        if lib.mm_abi_version() != ABI_VERSION:
            raise RuntimeError(f"{path}: ABI {lib.mm_abi_version()} != {ABI_VERSION}")
        self._lib = lib
        self.isa = "avx2" if lib.mm_isa() == 1 else "baseline"
        # Who shares a call's tiles: torch's OpenMP team, or this library's helper threads.
        self.threading = "openmp" if lib.mm_openmp() else "helpers"
        self._fused = lib.mm_lora_fused_f32
        self._fused.argtypes = [_VP, _I64, _VP, _I64, _VP, _VP, _I64, _I64, _I64, _VP, _I64,
                                _VP, _VP, _VP, _VP, _VP, _I64, _INT]  # fmt: skip
        self._shrink = lib.mm_lora_shrink_f32
        self._shrink.argtypes = [_VP, _I64, _VP, _I64, _VP, _I64, _I64, _VP, _I64, _VP, _VP,
                                 _VP, _VP, _I64, _INT]  # fmt: skip
        self._expand = lib.mm_lora_expand_f32
        self._expand.argtypes = [_VP, _I64, _VP, _I64, _VP, _I64, _I64, _VP, _I64, _VP, _VP,
                                 _VP, _VP, _VP, _I64, _INT]  # fmt: skip
        for f in (self._fused, self._shrink, self._expand):
            f.restype = _INT

    def set_isa(self, isa: str | None) -> str:
        """Force the "baseline" (no AVX2) code path, or None: the best the CPU has (tests)."""
        self.isa = "avx2" if self._lib.mm_set_isa(0 if isa == "baseline" else -1) else "baseline"
        return self.isa

    @staticmethod
    def _tables_ok(lw: LayerWeights, md: MetaTensors, pages: tuple[torch.Tensor, ...]) -> bool:
        for p in pages:
            if p.dtype != _F32 or p.dim() != 3 or not p.is_contiguous():
                return False
        return (
            lw.page_table.dtype == torch.int32
            and lw.page_table.is_contiguous()
            and lw.ranks.dtype == torch.int32
            and lw.ranks.is_contiguous()
            and md.sorted_tokens.dtype == torch.int64
            and md.sorted_tokens.is_contiguous()
            and md.seg_starts.dtype == torch.int32
            and md.seg_slots.dtype == torch.int32
            and md.seg_starts.is_contiguous()
            and md.seg_slots.is_contiguous()
        )

    @staticmethod
    def _rows_ok(*ts: torch.Tensor) -> bool:
        return all(t.dtype == _F32 and t.dim() == 2 and t.stride(1) == 1 for t in ts)

    def fused(
        self, y: torch.Tensor, x: torch.Tensor, lw: LayerWeights, md: MetaTensors, nseg: int,
        threads: int,
    ) -> bool:  # fmt: skip
        """y += per-row LoRA delta; False (nothing done) where this layout is not supported."""
        if not (
            self._rows_ok(y, x)
            and self._tables_ok(lw, md, (lw.a_pages, lw.b_pages))
            and lw.scales.dtype == _F32
            and lw.scales.is_contiguous()
        ):
            return False
        a, b = lw.a_pages, lw.b_pages
        rc = self._fused(
            y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), a.data_ptr(), b.data_ptr(),
            a.shape[2], b.shape[2], a.shape[1], lw.page_table.data_ptr(), lw.page_table.shape[1],
            lw.ranks.data_ptr(), lw.scales.data_ptr(), md.sorted_tokens.data_ptr(),
            md.seg_starts.data_ptr(), md.seg_slots.data_ptr(), nseg, threads,
        )  # fmt: skip
        return rc == 0

    def shrink(
        self, v: torch.Tensor, x: torch.Tensor, lw: LayerWeights, md: MetaTensors, nseg: int,
        threads: int,
    ) -> bool:  # fmt: skip
        """v[t, :r] = x[t] A^T and zeros past r, on the rows with an adapter (the caller zeroes
        the others)."""
        if not (self._rows_ok(x) and v.dtype == _F32 and v.dim() == 2 and v.is_contiguous()):
            return False
        if not self._tables_ok(lw, md, (lw.a_pages,)):
            return False
        a = lw.a_pages
        rc = self._shrink(
            v.data_ptr(), v.shape[1], x.data_ptr(), x.stride(0), a.data_ptr(), a.shape[2],
            a.shape[1], lw.page_table.data_ptr(), lw.page_table.shape[1], lw.ranks.data_ptr(),
            md.sorted_tokens.data_ptr(), md.seg_starts.data_ptr(), md.seg_slots.data_ptr(), nseg,
            threads,
        )  # fmt: skip
        return rc == 0

    def expand(
        self, y: torch.Tensor, v: torch.Tensor, lw: LayerWeights, md: MetaTensors, nseg: int,
        threads: int,
    ) -> bool:  # fmt: skip
        """y[t] += scale * v[t, :r] B^T on the rows with an adapter."""
        if not (self._rows_ok(y, v) and self._tables_ok(lw, md, (lw.b_pages,))):
            return False
        if lw.scales.dtype != _F32 or not lw.scales.is_contiguous():
            return False
        b = lw.b_pages
        rc = self._expand(
            y.data_ptr(), y.stride(0), v.data_ptr(), v.stride(0), b.data_ptr(), b.shape[2],
            b.shape[1], lw.page_table.data_ptr(), lw.page_table.shape[1], lw.ranks.data_ptr(),
            lw.scales.data_ptr(), md.sorted_tokens.data_ptr(), md.seg_starts.data_ptr(),
            md.seg_slots.data_ptr(), nseg, threads,
        )  # fmt: skip
        return rc == 0


_lock = threading.Lock()
# Per library, module globals {prefix}lib / {prefix}failed / {prefix}builder: the loaded library,
# whether it failed (logged once), and its background build.
_lib: NativeLib | None = None
_failed = False
# Why a library is unavailable (its spec name -> the error), once it failed.
_errors: dict[str, str] = {}
_builder: threading.Thread | None = None


def _disabled() -> bool:
    return not SETTINGS.native


@dataclass(frozen=True)
class _Spec:
    """One native library: where its state lives and how it is built and opened."""

    prefix: str  # of its module globals
    what: str  # in log lines
    fallback: str  # what serves when it is unavailable
    source: Path
    name: str
    abi: int
    variants: tuple[list[str], ...] | None  # compile flag variants (None: _compile's default)
    cls: type
    selfcheck: str  # the function of kernels.selfcheck that vets a loaded library

    def check(self, lib) -> str | None:
        from mintmesh.kernels import selfcheck

        return getattr(selfcheck, self.selfcheck)(lib)

    def path(self, cxx: str) -> Path:
        # The build is keyed by its source and the header it includes.
        src = self.source.read_bytes() + b"\0" + SHARE_HEADER.read_bytes()
        if self.variants is None:
            return _lib_path(cxx, src)
        flags = " ".join(" ".join(v) for v in self.variants)
        return _lib_path(cxx, src, self.name, self.abi, flags)

    def compile(self, cxx: str, path: Path) -> None:
        if self.variants is None:
            _compile(cxx, self.source, path)
        else:
            _compile(cxx, self.source, path, self.variants)


def _fail(spec: _Spec, e: BaseException) -> None:
    g = globals()
    if not g[spec.prefix + "failed"]:
        g[spec.prefix + "failed"] = True
        _errors[spec.name] = f"{type(e).__name__}: {e}"
        logger.warning(
            "native CPU %s unavailable (%s: %s); using %s",
            spec.what,
            type(e).__name__,
            e,
            spec.fallback,
        )


def _locate(spec: _Spec) -> tuple[str, Path]:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) found")
    return cxx, spec.path(cxx)


def _open(spec: _Spec, cxx: str, path: Path, build: bool):
    """The library at path, compiling it first if `build` (else None when it is not built).
    Raises on a failed compile or load."""
    if not path.exists():
        if not build:
            return None
        logger.info("building native CPU %s: %s", spec.what, path)
        spec.compile(cxx, path)
    lib = spec.cls(path)
    # The start-up self-check: a library that disagrees with the reference on the adversarial
    # inputs never serves (the caller's fallback does, with one warning naming it).
    why = spec.check(lib)
    if why is not None:
        raise RuntimeError(f"self-check against the reference failed ({lib.isa}): {why}")
    g = globals()
    with _lock:
        if g[spec.prefix + "lib"] is None:
            g[spec.prefix + "lib"] = lib
            logger.info(
                "native CPU %s loaded (%s, %s, %s)", spec.what, path.name, lib.isa,
                getattr(lib, "threading", "-"),
            )  # fmt: skip
        return g[spec.prefix + "lib"]


def _build_in_background(spec: _Spec, cxx: str, path: Path) -> None:
    try:
        _open(spec, cxx, path, True)
    except Exception as e:  # noqa: BLE001 - any build failure means: the fallback
        _fail(spec, e)


def _load(spec: _Spec, block: bool):
    g = globals()
    if g[spec.prefix + "lib"] is not None:
        return g[spec.prefix + "lib"]
    if g[spec.prefix + "failed"] or _disabled():
        return None
    with _lock:
        builder = g[spec.prefix + "builder"]
    if builder is not None:
        if block:
            builder.join()
        return g[spec.prefix + "lib"]
    try:
        cxx, path = _locate(spec)
        lib = _open(spec, cxx, path, block)
    except Exception as e:  # noqa: BLE001 - any compile/load failure means: the fallback
        _fail(spec, e)
        return None
    if lib is not None or block:
        return lib
    with _lock:
        if g[spec.prefix + "builder"] is None:
            t = threading.Thread(
                target=_build_in_background,
                args=(spec, cxx, path),
                name=f"mintmesh-native-{spec.name}-build",
                daemon=True,
            )
            g[spec.prefix + "builder"] = t
            t.start()
    return g[spec.prefix + "lib"]


def load(block: bool = True) -> NativeLib | None:
    """The native LoRA library, or None where it is off (--no-native-kernels) or failed to build
    (logged once). block=False: a cached build is loaded here, but a missing one is compiled in
    the background (None until it is ready) rather than on the calling thread."""
    return _load(_LORA, block)


# -- paged decode attention (attn_cpu.cpp) ---------------------------------------------------

ATTN_SOURCE = Path(__file__).with_name("attn_cpu.cpp")
ATTN_ABI_VERSION = 3
_I32 = torch.int32


class AttnLib:
    """The loaded attention library: fp32 decode attention through block tables, one call per
    layer for the whole decode batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        if lib.mm_attn_abi_version() != ATTN_ABI_VERSION:
            raise RuntimeError(f"{path}: ABI {lib.mm_attn_abi_version()} != {ATTN_ABI_VERSION}")
        self._lib = lib
        self.isa = "avx2" if lib.mm_attn_isa() == 1 else "baseline"
        # Who shares a call's work items: torch's OpenMP team, or this library's helper threads.
        self.threading = "openmp" if lib.mm_attn_openmp() else "helpers"
        self._decode = lib.mm_paged_decode_attn_f32
        self._decode.argtypes = [_VP, _I64, _I64, _VP, _I64, _I64, _VP, _VP, _I64, _I64, _I64,
                                 _I64, _VP, _VP, _VP, _VP, _I64, _I64, _I64, ctypes.c_float,
                                 _INT]  # fmt: skip
        self._decode.restype = _INT

    def set_isa(self, isa: str | None) -> str:
        """Force the "baseline" (no AVX2) code path, or None: the best the CPU has (tests)."""
        self.isa = (
            "avx2" if self._lib.mm_attn_set_isa(0 if isa == "baseline" else -1) else "baseline"
        )
        return self.isa

    def decode(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: torch.Tensor,
        lens: torch.Tensor,
        starts: torch.Tensor,
        blocks: torch.Tensor,
        scale: float,
        threads: int = 1,
    ) -> bool:
        """out[rows[s], h] = softmax(scale * q[h, rows[s]] K_s^T) V_s for every decode sequence s:
        its lens[s] tokens in blocks[starts[s]:starts[s + 1]] of k_cache / v_cache (one layer,
        [num_blocks, block_size, KVH, D]). out: [T, H, D]; q: [H, T, D] (strided rows). False
        (nothing done) where this layout or shape is not supported."""
        if not (
            out.dtype == q.dtype == k_cache.dtype == v_cache.dtype == _F32
            and out.device.type == q.device.type == k_cache.device.type == "cpu"
            and out.dim() == 3
            and q.dim() == 3
            and out.stride(2) == 1
            and q.stride(2) == 1
            and k_cache.dim() == 4
            and k_cache.shape == v_cache.shape
            and k_cache.is_contiguous()
            and v_cache.is_contiguous()
            and rows.dtype == torch.int64
            and lens.dtype == starts.dtype == blocks.dtype == _I32
            and rows.is_contiguous()
            and lens.is_contiguous()
            and starts.is_contiguous()
            and blocks.is_contiguous()
            and starts.numel() == rows.numel() + 1 == lens.numel() + 1
        ):
            return False
        nblocks, bs, kvh, d = k_cache.shape
        h = q.shape[0]
        if out.shape[1] != h or out.shape[2] != d or q.shape[2] != d:
            return False
        if blocks.numel() < int(starts[-1]) or out.shape[0] != q.shape[1]:
            return False
        # The kernel trusts starts to be a non-decreasing index into blocks.
        if int(starts[0]) < 0 or not bool((starts[1:] >= starts[:-1]).all()):
            return False
        rc = self._decode(
            out.data_ptr(), out.stride(0), out.stride(1), q.data_ptr(), q.stride(1), q.stride(0),
            k_cache.data_ptr(), v_cache.data_ptr(), bs, h, kvh, d, rows.data_ptr(),
            lens.data_ptr(), starts.data_ptr(), blocks.data_ptr(), rows.numel(), out.shape[0],
            nblocks, float(scale), int(threads),
        )  # fmt: skip
        return rc == 0


_attn_lib: AttnLib | None = None
_attn_failed = False
_attn_builder: threading.Thread | None = None


def _torch_openmp_flags() -> list[str] | None:
    """Flags that build against the OpenMP runtime this process's torch runs its GEMMs on (the
    libgomp mapped here), so the LoRA kernels share torch's team instead of running a second
    one; None where torch is not on OpenMP or that runtime's file is not found (the kernels
    then share their tiles with helper threads of their own, work_share.h)."""
    if not getattr(torch._C, "has_openmp", False):
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = {ln.split()[-1] for ln in maps.splitlines() if "/libgomp" in ln and ".so" in ln}
    if len(found) != 1:
        return None
    rt = Path(found.pop())
    if not rt.is_file():
        return None
    # --as-needed: the libgomp that -fopenmp adds by itself (the system's) is not linked in,
    # since torch's already provides every symbol.
    return ["-fopenmp", "-Wl,--as-needed", "-L", str(rt.parent), f"-l:{rt.name}",
            f"-Wl,-rpath,{rt.parent}"]  # fmt: skip


_OMP_FLAGS = _torch_openmp_flags()
# Both libraries share their work with torch's OpenMP team the same way (work_share.h).
_VARIANTS = (([*_OMP_FLAGS, "-pthread"],) if _OMP_FLAGS else ()) + (["-pthread"], [])
_LORA = _Spec("_", "LoRA kernels", "the torch CPU path", SOURCE, "lora_cpu", ABI_VERSION,
              _VARIANTS, NativeLib, "check_native_lora")  # fmt: skip
_ATTN = _Spec("_attn_", "attention kernel", "the torch attention path", ATTN_SOURCE, "attn_cpu",
              ATTN_ABI_VERSION, _VARIANTS, AttnLib, "check_decode_attention")  # fmt: skip


def unavailable_reason(which: str = "lora") -> str | None:
    """Why the native library `which` ("lora" or "attn") does not serve: None while it does (or
    was never asked for); "no compiler" / "disabled" where it cannot be built at all; else the
    build, load or self-check error."""
    spec = _LORA if which == "lora" else _ATTN
    if _disabled():
        return "disabled (--no-native-kernels)"
    if globals()[spec.prefix + "lib"] is not None:
        return None  # it serves (an error of an earlier attempt no longer applies)
    if _compiler() is None:
        return "no compiler"
    return _errors.get(spec.name)


def load_attn(block: bool = True) -> AttnLib | None:
    """The native attention library, or None where it is off (--no-native-kernels) or failed to
    build (logged once). block=False as load(): a missing build is compiled in the background."""
    return _load(_ATTN, block)
