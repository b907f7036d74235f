"""glibc's allocator: large blocks go back to the operating system as soon as they are freed.

glibc serves a request of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB to start with) with a
mapping of its own, unmapped on free. But the threshold is dynamic: each time such a block is
freed, glibc raises it to that block's size (up to 32 MiB), and from then on blocks of that
size come from the heap, where a freed block stays in the process until the heap's top is
free. The service allocates and frees blocks of megabytes all the time (model checkpoints
crossing from a model process, request bodies, published batches), so under load its RSS
climbs in steps and swings with the checkpoint cadence. Fixing the threshold (which turns the
dynamic adjustment off, as setting ``MALLOC_MMAP_THRESHOLD_`` does) keeps RSS at what is live:
measured with ``bench/saturation.py`` (60 s), RSS swung between +95 and +134 MiB over idle
with the dynamic threshold and stayed flat at +85 to +89 MiB with it fixed, at the same rate.

A process started with ``MALLOC_MMAP_THRESHOLD_`` in its environment keeps what the operator
chose; other C libraries (musl) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3
"""``mallopt`` parameter number (glibc's malloc.h)."""
THRESHOLD_BYTES = 128 * 1024


def fix_mmap_threshold(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold in this process; True when it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
