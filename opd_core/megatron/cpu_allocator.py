"""Keep freed tensor memory in the process on CPU, as PyTorch's CUDA caching allocator does.

    from opd_core.megatron.cpu_allocator import keep_freed_memory
    keep_freed_memory()   # once per process; True where glibc's mallopt was applied

On CPU every tensor comes from glibc malloc. Its defaults return freed memory to the kernel
eagerly: blocks above a (self-adjusting) size threshold are `mmap`ed and unmapped on free,
and free space at the top of the heap is trimmed. A training step frees and re-allocates
the same activations every step, so each step touches fresh pages and pays a page fault per
4 KiB. Measured on the toy student's Megatron step (batch 32, 2 cores): ~5,000 minor faults
per step (20 MB re-faulted), and the step 1.2-2.8x slower than with the two settings below,
which bring the faults to ~6 per step. (transformers' step in the same process happened to
stay below the thresholds; Megatron's [s, b, h] activations and its loss tensors did not.)

The settings: serve every allocation up to 1 GiB from the heap (never `mmap`), and trim the
heap only when 1 GiB at its top is free. The process's resident memory then stays at its
peak instead of shrinking between steps, which is what the CUDA caching allocator does on a
GPU. Applied only without a GPU (`cpu_shims.apply_cpu_shims`), and only with glibc (musl
and others are left alone). The environment variables MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ do the same from process start, where one controls the launch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30

_APPLIED: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to KEEP_BYTES; True if applied (idempotent)."""
    global _APPLIED
    if _APPLIED is not None:
        return _APPLIED
    _APPLIED = False
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _APPLIED = bool(
        libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES)
    )
    return _APPLIED
