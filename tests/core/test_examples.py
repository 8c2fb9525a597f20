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


def test_video_tracks_example_tracks_the_moving_shapes_and_writes_the_clip(tmp_path: Path) -> None:
    import importlib.util

    import av

    spec = importlib.util.spec_from_file_location("video_tracks", EXAMPLES / "video_tracks.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    clip = example.synthetic_clip()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOONDREAM_", "FAL_", "AIGATEWAY_"))}
    done = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / "video_tracks.py")], env={**env, "VIDEO_TRACKS_OUT": str(tmp_path)},
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Video: 240x320 upright (rotation 270), 30 frames, 3.0 s at 10 fps, h264" in out
    assert "Detected 'shape' in 15 frames (every 0.2 s), 0 failed." in out
    tracks = re.findall(r"#(\d+) shape: ([\d.]+)-([\d.]+) s, (\d+) frames, mean box \((\d+), (\d+)\) - \((\d+), (\d+)\) px", out)
    assert len(tracks) == 3
    times = [round(0.2 * k, 1) for k in range(15)]
    for label, (track_id, first, last, frames, *box) in zip(("red square", "green triangle", "blue circle"), tracks):
        seen = [t for t in times if any(s.label == label for s in clip.at(t).truth())][1:]  # confirmed on its 2nd frame
        assert (float(first), float(last), int(frames)) == (seen[0], seen[-1], len(seen)), label
        truth = [next(s for s in clip.at(t).truth() if s.label == label).bbox_px for t in seen]
        mean = [sum(b[i] for b in truth) / len(truth) for i in range(4)]
        assert all(abs(int(a) - b) <= 2 for a, b in zip(box, mean)), (label, box, mean)
    with av.open(str(tmp_path / "portrait-tracks.mp4")) as container:
        decoded = list(container.decode(video=0))
    assert len(decoded) == 15 and {(f.width, f.height) for f in decoded} == {(240, 320)}
    assert "Annotated clip: 15 frames, 240x320, libx264" in out


def test_ray_batch_example_labels_the_folder_on_a_local_cluster() -> None:
    """examples/ray_batch.py: a local Ray cluster, two actors, the README's job; every scene's
    circles as the scene says, the corrupt file as an error row."""
    out = run("ray_batch.py")
    assert out.startswith("Indexed 7 images on 2 Ray actors (18 requests, at most 20/s for the job):")
    assert "corrupt.jpg: error: image: not an image" in out
    for i, seed in enumerate(range(7, 13)):
        n = Scene.random(seed, width=960, height=640, count=4).count("circle")
        assert f"scene{i}.jpg: 960x640 px, {n} circle(s) (truth {n})" in out
