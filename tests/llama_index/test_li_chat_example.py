"""examples/llamaindex_chat_with_images.py runs offline (scripted text-only LLM, emulator) with
warnings as errors, and its printed answers match the scene's ground truth, across a restart."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llamaindex_chat_with_images.py"


def _example_scene():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("llamaindex_chat_with_images", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines things only; main() runs under __main__
    return module.SCENE


def _near(got: tuple[int, ...], want: tuple[float, ...], size: tuple[int, int]) -> bool:
    scales = (size[0], size[1]) * (len(got) // 2)
    return all(abs(g - w) <= 0.02 * s for g, w, s in zip(got, want, scales, strict=True))


def test_chat_with_images_example_runs_offline(tmp_path: Path) -> None:
    scene = _example_scene()
    handle = "img_" + hashlib.sha256(scene.encode()).hexdigest()[:8]
    size = scene.size
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOONDREAM_", "OPENAI_"))}
    done = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLE), str(tmp_path / "state")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Traceback" not in out + done.stderr
    lines = out.splitlines()
    assert lines[0].startswith("LLM: no OpenAI-compatible LLM configured") and "scripted text-only" in lines[0]
    assert lines[1].startswith("Vision: no MOONDREAM_API_KEY or MOONDREAM_BASE_URL set, using the offline emulator")
    first, restarted = out.split("=== Session 2")

    # Session 1: the photo became a handle; the model asked about it twice.
    assert f"How many red circles are in it?\n[image {handle}: {size[0]}x{size[1]} px]\n" in first
    for phrase in ("red circle", "blue square"):
        assert f"-> count_objects(image='{handle}', object='{phrase}')" in first
        counted = re.search(rf'<- count_objects: Counted (\d+) "{phrase}" in {handle} \({size[0]}x{size[1]} px\): (.*)', first)
        assert counted is not None, phrase
        assert int(counted.group(1)) == scene.count(phrase) > 0
        positions = [tuple(map(int, p)) for p in re.findall(r"#\d+ at \((\d+), (\d+)\)", counted.group(2))]
        truths = sorted(scene.matching(phrase), key=lambda t: (t.center[1], t.center[0]))
        assert len(positions) == len(truths)
        for got, truth in zip(positions, truths, strict=True):
            assert _near(got, (truth.center[0] * size[0], truth.center[1] * size[1]), size), (phrase, got)
        assert f'Agent: From the vision tools: Counted {scene.count(phrase)} "{phrase}" in {handle}' in first
    assert "Memory: 8 messages stored, 0 of their blocks images." in first

    # Session 2: new objects over the same directory; the stored handle still resolves.
    assert "after a restart" in restarted
    assert f"Memory: 8 messages stored; images stored: ['{handle}']" in restarted
    assert f"-> locate_objects(image='{handle}', object='blue square')" in restarted
    located = re.search(rf'<- locate_objects: Found 1 "blue square" in {handle} .*#1 box \((\d+), (\d+)\)-\((\d+), (\d+)\)', restarted)
    assert located is not None, restarted
    (square,) = scene.matching("blue square")
    assert _near(tuple(map(int, located.groups())), square.bbox_px, size)
    assert "[error]" not in out
    assert "Memory: 12 messages stored, 0 of their blocks images." in restarted
