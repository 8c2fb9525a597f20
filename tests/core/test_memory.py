"""moondream_tools._memory: freed heap memory handed back during bulk runs, rate-limited."""

from __future__ import annotations

import sys

from moondream_tools import _memory
from moondream_tools._memory import MemoryTrimmer


def test_trims_at_most_once_per_interval(monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(_memory, "_TRIM", lambda pad: calls.append(pad) or 1)
    trimmer = MemoryTrimmer(min_interval=3600)
    assert trimmer.trim() is True and trimmer.trim() is False and calls == [0]
    assert MemoryTrimmer(min_interval=0).trim() is True and calls == [0, 0]


def test_glibc_trim_is_found_on_linux_and_nothing_elsewhere(monkeypatch) -> None:
    found = _memory._malloc_trim()
    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert found is not None and found(0) in (0, 1)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _memory._malloc_trim() is None
    monkeypatch.setattr(_memory, "_TRIM", None)
    assert MemoryTrimmer(min_interval=0).trim() is False
