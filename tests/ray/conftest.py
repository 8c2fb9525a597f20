"""One local Ray cluster for the whole session, and the emulator it talks to.

- ``emulator``: a :class:`FakeMoondream` on its own event loop in a background thread of the
  test process (the driver blocks while a dataset runs; the actors reach the emulator over
  loopback at its URL). Its key is random and reaches the workers only through their
  environment (``MDT_RAY_TEST_KEY``, set before ``ray.init`` so the raylet and every worker
  inherit it), as a cluster's workers get theirs.
- ``ray_cluster``: ``ray.init(num_cpus=2, include_dashboard=False)`` once, ``ray.shutdown()``
  at the end of the session.

Warnings are errors in this suite. Ray's ``DataContext()`` warns (DeprecationWarning, from
``ray.data.context``) about its own deprecated fields while it sets their defaults, the first
time any dataset is made; the context is created once here with exactly that warning
ignored, so nothing else is hidden.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from moondream_tools.testing import FakeMoondream

from emulator_support import emulator_in_thread

from .ray_support import KEY, KEY_ENV


@pytest.fixture(scope="session")
def emulator() -> Iterator[FakeMoondream]:
    with emulator_in_thread(name="fake-moondream-ray", api_key=KEY) as server:
        yield server


@pytest.fixture
def fake(emulator: FakeMoondream) -> Iterator[FakeMoondream]:
    """The session's emulator, with no faults, requests, latency or rate limit left over."""
    emulator.reset()
    emulator.latency, emulator.rate_limit, emulator.rate_limited, emulator.max_in_flight = 0.0, None, 0, 0
    yield emulator
    emulator.reset()
    emulator.latency, emulator.rate_limit = 0.0, None


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    import ray
    import ray.data

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data\.context")
        context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    previous = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = KEY  # inherited by the raylet and every worker it starts
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = previous


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> str:
    """The key in this process's environment too, for a UDF called in-process."""
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY_ENV
