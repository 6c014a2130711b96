"""Process memory: what a worker holds, and a heap that gives freed memory back.

A worker of this package allocates and frees large tensors over and over (a gathered
ZeRO-3 parameter and its gradient per module, a merge block per tensor). glibc's malloc
serves an allocation above its mmap threshold with a fresh mapping and unmaps it on free;
anything below comes from the heap and stays in the process's resident memory after free.
By default the threshold is dynamic: every time a mapped chunk is freed, the threshold rises
to that chunk's size (up to 32 MiB on 64-bit), so after the first large frees every later
tensor of up to 32 MiB is carved from the heap, and fragmentation keeps it resident. In a
Fisher rank this was 2.6 GiB of growth over two steps on a 0.49B model at two ranks, more
than the rank's share of the model (bench/README.md, "fisher_memory_bench").

``bound_heap`` fixes the threshold (which turns off glibc's dynamic adjustment) and trims
the heap top eagerly, so the resident memory follows what is alive. Reference: mallopt(3),
M_MMAP_THRESHOLD and M_TRIM_THRESHOLD; the same knobs as the ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` environment variables.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

# mallopt(3) parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Allocations of at least this many bytes are mapped and given back on free. 64 KiB keeps
# small objects (Python's, the allocator's bookkeeping) on the heap, where they are cheap,
# and sends every tensor that matters for the peak to its own mapping.
MMAP_THRESHOLD_BYTES = 64 * 1024
# The heap top is trimmed as soon as this much is free at its end.
TRIM_THRESHOLD_BYTES = 1024 * 1024

_bounded = False


def bound_heap() -> bool:
    """Make this process's freed large allocations leave its resident memory (glibc only).

    Idempotent. Returns whether the settings took effect: False on a C library without
    ``mallopt`` (macOS, musl), where the process keeps its allocator's own behaviour.
    """
    global _bounded
    if _bounded:
        return True
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    _bounded = ok
    return ok


def rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
