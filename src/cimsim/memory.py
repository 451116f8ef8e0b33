"""Freed memory kept in the process, so that large tensors do not fault their pages in again.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it to the kernel at ``free``; it also trims the top of its heap once more
than 128 KiB is free there. A CPU forward pass then pays the kernel for every page of every
large activation, at every call: first-touch page faults and zeroing. The crossbar periphery
makes this worse, its partial sums being ``T`` times a layer's output (50 MB for one WRN-16-4
conv at batch 64). On this project's 2-core VM a fresh 50 MB tensor costs 20 ms to fill and a
reused one 3.5 ms, and a crossbar training step (benchmarks/run.py) is about a fifth faster.

``retain_freed_memory`` tells glibc to serve every block from its heap (``M_MMAP_MAX = 0``) and
to keep up to 2 GiB free at its top (``M_TRIM_THRESHOLD``): freed blocks are reused, as
jemalloc or tcmalloc would (PyTorch's CPU tuning guides recommend them for the same reason).
The cost is a resident size that stays at its peak. The entry points (train.py, evaluate.py,
reproduce.py, benchmarks/run.py) call it; ``CIMSIM_MALLOC=system`` leaves glibc's defaults,
and other C libraries (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # bytes free at the heap's top before glibc gives them back (2 GiB)

_APPLIED: list[bool] = []


def retain_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse (see the module docstring); idempotent. Returns
    whether it applies: False off glibc or with ``CIMSIM_MALLOC=system``."""
    if _APPLIED:
        return _APPLIED[0]
    applied = False
    if os.environ.get("CIMSIM_MALLOC", "retain") != "system" and _is_glibc():
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
    _APPLIED.append(applied)
    return applied


def _is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
