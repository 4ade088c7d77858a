"""Once start-up is done: give back the memory start-up used and will not use again.

Start-up (imports, config parsing, probing the host, recovery) leaves garbage and freed
heap behind. `after_startup` collects the garbage, moves what survives into the garbage
collector's permanent generation (`gc.freeze`: later collections do not walk the
thousands of module-level objects again, and do not touch their pages), and asks glibc
to return the free parts of its heaps to the kernel (`malloc_trim(0)`). It never fails
the start: where there is no glibc it only collects.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)


def after_startup() -> None:
    gc.collect()
    gc.freeze()
    _malloc_trim()


def _malloc_trim() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to return this way
        log.debug("malloc_trim is not available")
        return
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
