"""Native CPU LoRA ops (fp32): lora_cpu.cpp, built on first use with the system C++ compiler.

The library has a plain C ABI (no torch headers, no ninja: one g++ call of a couple of seconds)
and is loaded with ctypes. It is cached per machine under the torch extensions directory
($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), keyed by the source, the flags and the
compiler, so a process normally only dlopens it. Where no compiler works, one warning is logged
and the CPU backend keeps its torch strategies (MINTMESH_NATIVE=0 turns the library off).

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
from pathlib import Path

import torch

from mintmesh.kernels.meta import MetaTensors
from mintmesh.kernels.pool import LayerWeights

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_cpu.cpp")
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


def _lib_path(cxx: str, src: bytes) -> Path:
    ver = _run([cxx, "--version"], timeout=30)
    key = hashlib.sha256()
    for part in (src, " ".join(_BASE_FLAGS).encode(), cxx.encode(), ver.stdout.encode(),
                 platform.machine().encode(), str(ABI_VERSION).encode()):  # fmt: skip
        key.update(part)
        key.update(b"\0")
    return build_dir() / f"lora_cpu_{key.hexdigest()[:16]}.so"


def _compile(cxx: str, src_path: Path, out: Path) -> None:
    """Compile to a temporary file, then rename it into place (atomic: concurrent builders and
    readers never see a partial library). With OpenMP if the toolchain has it, else without."""
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in (["-fopenmp"], []):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            r = _run([cxx, *_BASE_FLAGS, *extra, str(src_path), "-o", tmp])
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
_lib: NativeLib | None = None
_failed = False
_builder: threading.Thread | None = None


def _disabled() -> bool:
    return os.environ.get("MINTMESH_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def _fail(e: BaseException) -> None:
    global _failed
    if not _failed:
        _failed = True
        logger.warning(
            "native CPU LoRA kernels unavailable (%s: %s); using the torch CPU path",
            type(e).__name__,
            e,
        )


def _load_or_build(build: bool) -> NativeLib | None:
    """The library, compiling it if `build` (else None when no cached build exists). Raises on
    a failed compile or load."""
    global _lib
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) found")
    path = _lib_path(cxx, SOURCE.read_bytes())
    if not path.exists():
        if not build:
            return None
        logger.info("building native CPU LoRA kernels: %s", path)
        _compile(cxx, SOURCE, path)
    lib = NativeLib(path)
    with _lock:
        if _lib is None:
            _lib = lib
            logger.info("native CPU LoRA kernels loaded (%s, %s)", path.name, lib.isa)
    return _lib


def _build_in_background() -> None:
    try:
        _load_or_build(True)
    except Exception as e:  # noqa: BLE001 - any build failure means: torch path
        _fail(e)


def load(block: bool = True) -> NativeLib | None:
    """The native library, or None where it is off or failed to build (logged once).
    block=False: a cached build is loaded here, but a missing one is compiled in the background
    (None until it is ready) rather than on the calling thread."""
    global _builder
    if _lib is not None:
        return _lib
    if _failed or _disabled():
        return None
    with _lock:
        builder = _builder
    if builder is not None:
        if block:
            builder.join()
        return _lib
    try:
        lib = _load_or_build(block)
    except Exception as e:  # noqa: BLE001 - any compile/load failure means: torch path
        _fail(e)
        return None
    if lib is not None or block:
        return lib
    with _lock:
        if _builder is None:
            _builder = threading.Thread(
                target=_build_in_background, name="mintmesh-native-build", daemon=True
            )
            _builder.start()
    return _lib
