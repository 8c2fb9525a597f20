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


def test_rag_over_images_example_finds_the_right_images() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("rag_over_images", EXAMPLES / "rag_over_images.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    scenes = example.scenes()
    out = run("rag_over_images.py")
    assert "Indexed 4 images:" in out
    triangle = out.split("Q: Which image has a yellow triangle?")[1].split("Q:")[0]
    assert "A: garden.jpg (960x640 px), 1 x 'yellow triangle'" in triangle
    (truth,) = scenes["garden.jpg"].matching("yellow triangle")
    box = [int(v) for v in re.search(r"box \((\d+), (\d+)\) - \((\d+), (\d+)\)", triangle).groups()]  # type: ignore[union-attr]
    assert all(abs(a - b) <= 2 for a, b in zip(box, truth.bbox_px))
    text = out.split("Q: Where is the text EXIT?")[1]
    assert "A: hallway.jpg (960x640 px), 2 x 'text'" in text and "reads: EXIT / GATE 12" in text
    boxes = [[int(v) for v in m] for m in re.findall(r"box \((\d+), (\d+)\) - \((\d+), (\d+)\)", text)]
    truths = [t.bbox_px for t in scenes["hallway.jpg"].text_truth()]
    assert len(boxes) == len(truths)
    for got, want in zip(boxes, truths):
        assert all(abs(a - b) <= 2 for a, b in zip(got, want))


def test_chat_with_images_example_counts_the_attached_photo_across_turns_and_a_restart() -> None:
    import base64
    import hashlib

    out = run("chat_with_images.py")
    scene = Scene.demo()
    handle = "img_" + hashlib.sha256(scene.encode()).hexdigest()[:8]
    assert base64.b64encode(scene.encode()).decode()[:40] not in out
    assert out.startswith("Model: a scripted model") and "Vision: the offline Moondream emulator." in out
    before, restart, after = out.partition("--- restart:")
    assert restart
    assert f"(the photo is now [image {handle}: {scene.width}x{scene.height} px])" in before
    for part, thing, answer in (
        (before, "red circle", "There are 2 red circles."),
        (before, "blue square", "There is 1 blue square."),
        (after, "yellow triangle", "There is 1 yellow triangle."),
    ):
        n = scene.count(thing)
        assert f'Counted {n} "{thing}" in {handle} ({scene.width}x{scene.height} px)' in part
        assert f"Agent: {answer}" in part and answer.split()[2] == str(n)
    assert "!!" not in out
    assert f"the photo is kept as: [image {handle}: {scene.width}x{scene.height} px]" in after
