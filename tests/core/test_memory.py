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


def test_the_planner_pool_works_in_a_forked_child() -> None:
    """A process forked after planning (multiprocessing's default on Linux) plans too: the
    parent's pool has no threads in the child, so the child makes its own."""
    import os
    import warnings

    from moondream_tools.indexing import batching

    parent = batching._planner_pool()
    assert parent.submit(lambda: 41 + 1).result(timeout=10) == 42
    with warnings.catch_warnings():  # 3.12+: fork() of a multi-threaded process warns
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its pool runs work
        code = 1
        try:
            pool = batching._planner_pool()
            code = 0 if pool is not parent and pool.submit(lambda: 7).result(timeout=5) == 7 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert batching._planner_pool() is parent  # the parent keeps its pool
