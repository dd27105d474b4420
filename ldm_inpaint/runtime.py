"""Memory work with the operating system: the allocator settings that the command-line tools apply at start-up
(never the library on import), and giving back the pages of memory-mapped weights once they are copied.

glibc's allocator serves every block above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
unmaps it on free. A UNet step on CPU allocates tens of such activations (a GEGLU projection at 512x512 is
84 MB), so each one is page-faulted in anew on first touch: the fault handling, not arithmetic, is then most of
the time of the elementwise ops and of the bias copy in ``addmm``. Keeping freed blocks in the heap makes the
next allocation of the same size reuse mapped pages. Measured on the 2-core benchmark machine (full-size SD1.5
UNet, float32, 512x512, CFG batch): 8.3 -> 7.0 s per step plain, 7.6 -> 6.8 s with packed convolutions.

The price is fragmentation, worst in the VAE: its activations (134-268 MB at 512x512 in float32) fit none of
the UNet's freed blocks nor, often, each other's, so the heap grows by a varying amount (peaks of 6.2-7.9 GB
for the same SD1.5 512 px process). The lean mode serves the VAE as glibc normally would: the heap's free pages
are given back before each VAE call, and blocks of 32 MiB or more get their own mapping, returned on free, for
its duration. Peak memory is then what the VAE holds at once (6.1 GB in that process, in both runs), at the
cost of the page faults (about 10 % of a 512 px float32 call on that machine).

The one-off packing of convolution weights gets its own mappings in both modes: kept in the heap, its
weight-sized temporaries (up to 118 MB) would leave holes between the packed weights that nothing reuses,
0.56 GiB of the full-size SD1.5 UNet and VAE in float32.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor

# mallopt() parameters, <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX = 65536  # glibc's default count of separately mapped blocks
_LARGEST_MMAP_THRESHOLD = 32 * 2**20  # glibc refuses a higher one on 64-bit systems
_MADV_DONTNEED = 4  # <sys/mman.h>

_kept = False  # keep_freed_memory() applied
_lean = False
_mapping = False  # a fresh_large_blocks() block that switched the allocator is open (nested ones leave it)


@functools.cache
def _c_library() -> ctypes.CDLL | None:
    """This process's C library, one handle for every call (errno readable after each); None off Linux."""
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _libc() -> ctypes.CDLL | None:
    """The C library if it has glibc's ``mallopt`` and ``malloc_trim``, else None."""
    libc = _c_library()
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory(*, lean: bool = False) -> bool:
    """Make glibc keep freed memory for reuse (``M_MMAP_MAX = 0``: large blocks come from the heap;
    ``M_TRIM_THRESHOLD`` 2 GiB: the heap top is given back only beyond that). ``lean``: except in VAE calls
    (see :func:`fresh_large_blocks`; weight packing is excepted in both modes). Returns whether the setting
    was applied (False on systems without glibc). The process keeps its peak heap until it exits: for a command that runs one
    model, that is the memory it needs anyway."""
    global _kept, _lean
    libc = _libc()
    if libc is None:
        return False
    _kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    _lean = lean and _kept
    return _kept


@contextmanager
def fresh_large_blocks(*, one_off: bool = False) -> Iterator[None]:
    """The pipeline runs the VAE inside this, and a packed convolution its one-off packing (``one_off``: its
    temporaries are as large as the weight). Blocks of 32 MiB or more are then mapped for themselves and
    unmapped on free, until the block that switched ends: after ``keep_freed_memory(lean=True)`` in both
    cases, the heap's free pages going back to the system first; after ``keep_freed_memory()`` for
    ``one_off`` blocks only. Otherwise it does nothing."""
    global _mapping
    switch = (_lean or (one_off and _kept)) and not _mapping
    libc = _libc() if switch else None
    if libc is not None:
        if _lean:
            libc.malloc_trim(0)
        libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)
        libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
        _mapping = True
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_MAX, 0)
            _mapping = False


def release_file_pages(tensor: Tensor, path: str | Path) -> int:
    """Give back the resident memory of ``tensor`` if it is memory-mapped from the file ``path``; returns the
    number of bytes released (0 when it is not, and on systems other than Linux).

    ``.ckpt`` files are mapped privately (``torch.load(mmap=True)``): their weights are the file's pages, read
    on first touch and counted in the process's resident memory until the whole file is unmapped. Once a
    weight has been copied (cast to another dtype, moved, packed for oneDNN) and its source is not used any
    more, ``madvise(MADV_DONTNEED)`` drops the whole pages it spans inside the mapping of ``path`` (the
    kernel would read them from the file again if they were touched). Call it only for tensors that nothing
    writes to and nothing will read again.
    """
    libc = _c_library()
    if libc is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    target = os.path.realpath(path)
    page = os.sysconf("SC_PAGE_SIZE")
    released = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[1][3] != "p" or fields[5].strip() != target:
                continue
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            first = -(-max(start, low) // page) * page
            last = min(end, high) // page * page
            if first < last:
                _madvise(libc, first, last - first)
                released += last - first
    return released


def _madvise(libc: ctypes.CDLL, address: int, length: int) -> None:
    if libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), _MADV_DONTNEED) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"madvise(MADV_DONTNEED) of {length} bytes failed: {os.strerror(errno)}")
