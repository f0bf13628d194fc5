"""The kernels' process-wide settings: set once by the process that serves (the executor's
config, see services/executor/config.py: --native-kernels, --lora-threads, --attn-threads), read
by the kernels as parameters. No kernel reads an environment variable."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SETTINGS", "KernelSettings", "configure"]


@dataclass
class KernelSettings:
    # The native CPU libraries (kernels/*.cpp); False: the torch strategies serve.
    native: bool = True
    # Threads of the native LoRA kernels, the caller included: torch's OpenMP team where the
    # library is built against it (native.py), else helpers sharing tiles (work_share.h).
    lora_threads: int = 2
    # Threads of the native paged decode attention, the caller included: torch's OpenMP team
    # where the library is built against it, else helpers (as the LoRA kernels). Measured in
    # the engine, small backbone, 24 decode rows of ~180 tokens: 13 ms a step on one thread,
    # 7-10 ms on torch's team of two (15 ms on two of its own helper threads).
    attn_threads: int = 2


SETTINGS = KernelSettings()


def configure(
    *, native: bool | None = None, lora_threads: int | None = None, attn_threads: int | None = None
) -> KernelSettings:
    """Set what is given (None keeps the current value); returns the settings."""
    for name, val in (("lora_threads", lora_threads), ("attn_threads", attn_threads)):
        if val is not None and int(val) < 1:
            raise ValueError(f"{name}={val} must be >= 1")
    if native is not None:
        SETTINGS.native = bool(native)
    if lora_threads is not None:
        SETTINGS.lora_threads = int(lora_threads)
    if attn_threads is not None:
        SETTINGS.attn_threads = int(attn_threads)
    return SETTINGS
