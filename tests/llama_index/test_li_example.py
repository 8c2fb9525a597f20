"""examples/llamaindex_agent.py runs offline (scripted LLM, emulator) with warnings as errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llamaindex_agent.py"


def test_example_runs_offline() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOONDREAM_", "OPENAI_"))}
    done = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLE)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("LLM: no OpenAI-compatible LLM configured") and "scripted" in lines[0]
    assert lines[1].startswith("Vision: no MOONDREAM_API_KEY or MOONDREAM_BASE_URL set, using the offline emulator")
    for tool in ("describe_image", "count_objects", "locate_objects", "segment_object"):
        assert f"-> {tool}(image='photo'" in done.stdout and f"<- {tool}: " in done.stdout
    assert '<- count_objects: Counted 2 "red circle" in photo (960x640 px)' in done.stdout
    assert "segment_object(image='photo', object='blue square', box=[" in done.stdout
    assert "Agent: From the vision tools:" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
