"""The process's memory allocator, tuned for attack loops. Imports nothing heavy: the CLI calls it
before every command, --help included."""
from __future__ import annotations

import os
import sys

# glibc hands a freed block above its mmap threshold straight back to the system, and trims the
# heap's free top once it passes the trim threshold; every large activation of every attack step
# then comes back as fresh pages, each faulted in and zeroed by the kernel (27k-83k faults a step
# on PP-LCNet at batch 32). onnxruntime keeps its own arena; torch on the CPU has none.
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold on 64-bit systems
TRIM_THRESHOLD = 1 << 30
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks of up to 32 MiB for reuse and not to trim its heap below
    1 GiB of free top, so attack steps reuse their activations' pages (20-30% faster steps on
    PP-LCNet, for a higher resident size between peaks). Left alone when glibc's own malloc
    settings are in the environment, or off glibc. Returns whether it applied."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _MALLOC_ENV) \
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))
