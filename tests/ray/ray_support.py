"""Constants the Ray tests share (imported by conftest.py and the test modules; not a test file)."""

from __future__ import annotations

import secrets

#: The environment variable the workers read the emulator's key from.
KEY_ENV = "MDT_RAY_TEST_KEY"
#: The emulator's key: random, so a test can look for its bytes anywhere they must not be.
KEY = "mdk-" + secrets.token_hex(16)
