"""Giving freed memory back to the system during long bulk runs (glibc only).

A 12 MP photo decodes into ~12 MiB blocks. glibc's malloc serves the first ones with
``mmap`` and returns them on ``free``, but each such free raises its ``mmap`` threshold (up
to 32 MiB) and its trim threshold (twice that): from then on the decoder threads' blocks
come from per-thread arenas, which keep up to that much free memory each. Over a job of
thousands of images the process's RSS climbs far above what it uses (``bench_batch``: 189
MiB of growth for 1,000 images, 155 MiB for 250; with the thresholds fixed by
``MALLOC_TRIM_THRESHOLD_`` it stays near 75 MiB).

A library should not retune the process's allocator, so the bulk paths call
:func:`trim_freed_memory` after each image or part instead: glibc's ``malloc_trim(0)`` hands the
free pages of every arena back (about 2 ms), at most once per ``min_interval``. Elsewhere
(macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

__all__ = ["MemoryTrimmer", "trim_freed_memory"]


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes  # some Python builds have no _ctypes: then there is nothing to trim with

        function = ctypes.CDLL(None).malloc_trim  # the C library this process runs on
    except (ImportError, OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_TRIM = _malloc_trim()


class MemoryTrimmer:
    """Returns freed heap memory to the system, at most once per ``min_interval`` seconds.

    Thread-safe; :meth:`trim` blocks for the call (a few ms): run it in a worker thread.

    >>> trimmer = MemoryTrimmer(min_interval=0.0)
    >>> trimmer.trim() in (True, False)  # False where the C library has no malloc_trim
    True
    """

    def __init__(self, min_interval: float = 0.25) -> None:
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._last = float("-inf")

    def trim(self) -> bool:
        """Trim now unless the last trim was under ``min_interval`` ago; True if it ran."""
        if _TRIM is None:
            return False
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.min_interval:
                return False
            self._last = now
        _TRIM(0)
        return True


#: The process's trimmer: every bulk path shares it (one trim serves them all).
trim_freed_memory = MemoryTrimmer().trim
