"""The offline examples run (emulator, warnings as errors) and tell the scene's truth."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from moondream_tools.testing import Scene

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(name: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOONDREAM_", "FAL_", "AIGATEWAY_"))}
    done = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / name)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    return done.stdout


def test_providers_example_runs_on_the_emulators_fal_routes() -> None:
    out = run("providers.py")
    scene = Scene.demo()
    assert out.startswith("No FAL_KEY set: using the offline emulator's fal.ai routes")
    assert f'Counted {scene.count("red circle")} "red circle" in img_1 (960x640 px)' in out
    area = re.search(r"area ([\d,]+) px", out)
    truth = sum(t.area_px for t in scene.matching("red circle"))
    assert area is not None and abs(int(area.group(1).replace(",", "")) - truth) <= 0.02 * truth
    assert f"SAM 3 returned {scene.count('red circle')} mask(s)" in out
