"""The allocator settings of ``ldm_inpaint.runtime``, observed through glibc's own accounting (``mallinfo2``:
bytes in separately mapped blocks). Each case runs in a fresh interpreter, since the settings are process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json, sys
import torch
from ldm_inpaint import runtime
from ldm_inpaint.models.packing import PackedConv2d

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2

def mapped_for_block():
    before = libc.mallinfo2().hblkhd
    block = torch.ones(64 * 2**20, dtype=torch.uint8)
    return libc.mallinfo2().hblkhd - before

mode, part = sys.argv[1:]
applied = None if mode == "default" else runtime.keep_freed_memory(lean=mode == "lean")
if part == "packing":
    # A packed convolution's first call packs its weight (here 36 MiB) inside the block: the packed copy is mapped.
    conv = PackedConv2d(torch.nn.Conv2d(1024, 1024, 3, padding=1))
    before = libc.mallinfo2().hblkhd
    with torch.inference_mode():
        conv(torch.zeros(1, 1024, 4, 4))
    print(json.dumps({"applied": applied, "packing": libc.mallinfo2().hblkhd - before}))
else:
    outside = mapped_for_block()
    with runtime.fresh_large_blocks():
        inside = mapped_for_block()
        with runtime.fresh_large_blocks():
            pass
        nested = mapped_for_block()  # the inner block's end does not end the outer one
    after = mapped_for_block()
    print(json.dumps({"applied": applied, "outside": outside, "inside": inside, "nested": nested, "after": after}))
"""

BLOCK = 64 * 2**20
PACKED_WEIGHT = 1024 * 1024 * 9 * 4

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings")


def probe(mode: str) -> dict:
    """What the probe sees in ``mode``: packing and the other blocks each in a fresh process, so that neither
    finds the other's freed blocks in the heap."""
    seen = {}
    for part in ("blocks", "packing"):
        command = [sys.executable, "-c", PROBE, mode, part]
        seen |= json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    return seen


def test_glibc_default_maps_a_large_block_for_itself() -> None:
    # What the settings change: without them, a 64 MiB tensor is its own mapping, returned on free.
    seen = probe("default")
    assert seen["outside"] >= BLOCK and seen["inside"] >= BLOCK and seen["after"] >= BLOCK


def test_kept_memory_serves_large_blocks_from_the_heap_except_in_packing() -> None:
    seen = probe("fast")
    assert {key: value for key, value in seen.items() if key != "packing"} == {
        "applied": True,
        "outside": 0,
        "inside": 0,
        "nested": 0,
        "after": 0,
    }
    assert seen["packing"] >= PACKED_WEIGHT


def test_lean_mode_maps_large_blocks_only_inside_vae_and_packing_blocks() -> None:
    seen = probe("lean")
    assert seen["applied"] is True and seen["outside"] == 0 and seen["after"] == 0
    assert seen["inside"] >= BLOCK and seen["nested"] >= BLOCK
    assert seen["packing"] >= PACKED_WEIGHT
