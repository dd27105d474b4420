"""Process-wide settings that the command-line tools apply at start-up (never the library on import).

glibc's allocator serves every block above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
unmaps it on free. A UNet step on CPU allocates tens of such activations (a GEGLU projection at 512x512 is
84 MB), so each one is page-faulted in anew on first touch: the fault handling, not arithmetic, is then most of
the time of the elementwise ops and of the bias copy in ``addmm``. Keeping freed blocks in the heap makes the
next allocation of the same size reuse mapped pages. Measured on the 2-core benchmark machine (full-size SD1.5
UNet, float32, 512x512, CFG batch): 8.3 -> 7.0 s per step plain, 7.6 -> 6.8 s with packed convolutions.

The price is fragmentation, worst in the VAE: its activations (134-268 MB at 512x512 in float32) fit none of
the UNet's freed blocks nor, often, each other's, so the heap grows by a varying amount (peaks of 6.2-7.9 GB
for the same SD1.5 512 px process); the first call's one-off packing of convolution weights leaves weight-sized
temporaries (up to 118 MB) behind too. The lean mode serves both as glibc normally would: the heap's free pages
are given back before each VAE call and each packing, and blocks of 32 MiB or more get their own mapping,
returned on free, for its duration. Peak memory is then what the VAE holds at once (6.1 GB in that process, in
both runs), at the cost of the page faults (about 10 % of a 512 px float32 call on that machine).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt() parameters, <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX = 65536  # glibc's default count of separately mapped blocks
_LARGEST_MMAP_THRESHOLD = 32 * 2**20  # glibc refuses a higher one on 64-bit systems

_lean = False
_depth = 0  # fresh_large_blocks() blocks open now (only the outermost one switches)


def _libc() -> ctypes.CDLL | None:
    """The C library if it has glibc's ``mallopt`` and ``malloc_trim``, else None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory(*, lean: bool = False) -> bool:
    """Make glibc keep freed memory for reuse (``M_MMAP_MAX = 0``: large blocks come from the heap;
    ``M_TRIM_THRESHOLD`` 2 GiB: the heap top is given back only beyond that). ``lean``: except in VAE calls
    and weight packing (see :func:`fresh_large_blocks`). Returns whether the setting was applied (False on
    systems without glibc). The process keeps its peak heap until it exits: for a command that runs one
    model, that is the memory it needs anyway."""
    global _lean
    libc = _libc()
    if libc is None:
        return False
    applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    _lean = lean and applied
    return applied


@contextmanager
def fresh_large_blocks() -> Iterator[None]:
    """The pipeline runs the VAE inside this, and a packed convolution its one-off packing (whose temporaries
    are as large as the weight). After ``keep_freed_memory(lean=True)``: the heap's free pages go back to the
    system first, and blocks of 32 MiB or more are mapped for themselves and unmapped on free until the
    outermost such block ends. Otherwise it does nothing."""
    global _depth
    libc = _libc() if _lean and _depth == 0 else None
    if libc is not None:
        libc.malloc_trim(0)
        libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)
        libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if libc is not None:
            libc.mallopt(_M_MMAP_MAX, 0)
