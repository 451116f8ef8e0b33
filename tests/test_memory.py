"""``cimsim.memory``: after ``retain_freed_memory`` glibc serves large tensors from its heap, and
keeps them there when they are freed; ``CIMSIM_MALLOC=system`` leaves its defaults. Each case
runs in a fresh interpreter (the setting is process-wide) and reads glibc's own accounting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cimsim.memory import _is_glibc

PROBE = """
import ctypes, torch
from cimsim.memory import retain_freed_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
applied = retain_freed_memory()
t = torch.empty(1 << 24)  # 64 MiB, twice glibc's largest mmap threshold
mapped = libc.mallinfo2().hblkhd
del t
print(applied, mapped >> 20, libc.mallinfo2().fordblks >> 20)
"""


def probe(env: dict) -> tuple[bool, int, int]:
    """(applied, MiB in mmapped blocks while the tensor lives, MiB free in the heap after)."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True,
        text=True, check=True, timeout=300,
    ).stdout.split()  # fmt: skip
    return out[0] == "True", int(out[1]), int(out[2])


@pytest.mark.skipif(not _is_glibc(), reason="glibc's allocator only")
def test_large_tensors_come_from_the_heap_and_stay_there_when_freed():
    applied, mapped, kept = probe({"CIMSIM_MALLOC": "retain"})
    assert applied
    assert mapped < 64  # not an mmap of its own
    assert kept >= 64  # freed, and kept for the next one


@pytest.mark.skipif(not _is_glibc(), reason="glibc's allocator only")
def test_cimsim_malloc_system_keeps_glibcs_defaults():
    applied, mapped, kept = probe({"CIMSIM_MALLOC": "system"})
    assert not applied
    assert mapped >= 64  # glibc maps it on its own, and unmaps it at free
    assert kept < 64
