"""``moondream-tools ... --batch-api``: the skills through Moondream's Batch API, as the same records.

In process (click's CliRunner) and as subprocesses of the installed ``moondream-tools`` script,
against the emulator's Batch API. Ground truth: the scenes' shapes, the bytes on disk (sha256
ids), a standard-path run of the same command (captions), what the emulator recorded
(``fake.batches``: completions, part uploads, downloads; ``fake.requests``) and the lines of
the JSON Lines file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from moondream_tools.batch import estimate_cost
from moondream_tools.cli.app import cli
from moondream_tools.results import Usage
from moondream_tools.testing import FakeMoondream, Scene, Shape

SCRIPT = Path(sys.executable).parent / "moondream-tools"
BATCH_ARGS = ("--batch-api", "--poll-interval", "0.01")


# ---------------------------------------------------------------- helpers


def scene(k: int) -> Scene:
    """Two circles (red, green) and a blue square, placed by ``k``."""
    return Scene(640, 480, [
        Shape("circle", "red", (100 + 30 * k, 100 + 20 * k), 90),
        Shape("square", "blue", (480 - 20 * k, 120 + 30 * k), 110),
        Shape("circle", "green", (250 + 30 * k, 380 - 20 * k), 70),
    ])


def make_photos(root: Path, count: int = 4) -> dict[str, Scene]:
    """``photos/a<k>.jpg`` (and a PNG): ``{source as the command reports it: scene}``."""
    (root / "photos").mkdir()
    scenes = {}
    for k in range(count):
        name = f"photos/a{k}.png" if k == count - 1 else f"photos/a{k}.jpg"
        s = scene(k)
        (root / name).write_bytes(s.encode("PNG") if name.endswith(".png") else s.encode("JPEG", 95))
        scenes[name] = s
    return scenes


def env_of(fake: FakeMoondream) -> dict[str, Any]:
    return {"MOONDREAM_BASE_URL": fake.base_url, "MOONDREAM_API_KEY": fake.api_key, "FAL_KEY": None}


def run(fake: FakeMoondream, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=env_of(fake), catch_exceptions=False)


def spawn(fake: FakeMoondream, cwd: Path, *args: str) -> subprocess.Popen[str]:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "moondream_tools.cli"]
    env = {**os.environ, "MOONDREAM_BASE_URL": fake.base_url, "MOONDREAM_API_KEY": fake.api_key or ""}
    return subprocess.Popen([*command, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def lines(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes() if path.exists() else b""
    assert data == b"" or data.endswith(b"\n"), "a partial last line"
    return [json.loads(line) for line in data.decode().splitlines()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def near(a: Any, b: Any, tol: float = 2.0) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


@pytest.fixture
def photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Scene]:
    monkeypatch.chdir(tmp_path)
    return make_photos(tmp_path)


# ---------------------------------------------------------------- the records


def test_caption_matches_the_standard_path_and_reports_both_costs(
    threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path
) -> None:
    standard = run(threaded_fake, "caption", "photos", "--jsonl", "standard.jsonl")
    assert standard.exit_code == 0, standard.stderr
    result = run(threaded_fake, "caption", "photos", *BATCH_ARGS, "--jsonl", "captions.jsonl")
    assert result.exit_code == 0, result.stderr
    records = lines(tmp_path / "captions.jsonl")
    assert sorted(r["source"] for r in records) == sorted(photos), "every input once"
    want = {r["source"]: r["caption"] for r in lines(tmp_path / "standard.jsonl")}
    for record in records:
        assert list(record)[:6] == ["source", "image_id", "width", "height", "skill", "arguments"]
        assert record["image_id"] == sha256(tmp_path / record["source"])
        assert (record["width"], record["height"]) == (640, 480) and record["skill"] == "caption"
        assert record["arguments"] == {"length": "normal", "batch": True}
        assert record["caption"] == want[record["source"]] and record["error"] is None
    assert (tmp_path / "captions.jsonl.batch" / "0001-caption" / "job.json").is_file()

    (batch,) = threaded_fake.batches.values()
    assert batch.lines == 4 and batch.completes == 1
    usage = Usage(**batch.usage)
    batch_usd, standard_usd = estimate_cost(usage)
    assert batch_usd * 2 == pytest.approx(standard_usd)
    assert f"Batch API tokens: {usage.input_tokens:,} input, {usage.output_tokens:,} output" in result.stderr
    shown = re.search(r"estimated cost \$([\d.]+) at the batch price \(\$([\d.]+) at the standard price\)", result.stderr)
    assert shown is not None, result.stderr
    printed_batch, printed_standard = float(shown.group(1)), float(shown.group(2))
    assert printed_batch == pytest.approx(batch_usd, rel=0.005) and printed_standard == pytest.approx(standard_usd, rel=0.005)
    assert printed_batch * 2 == pytest.approx(printed_standard, rel=0.01), "the batch price is half"
    assert "moondream-tools caption (Batch API): 4 done, 0 skipped, 0 failed, 1 batch job" in result.stderr
    assert "completed, 4 of 4 done, 0 failed" in result.stderr, "plain progress lines off a terminal"

    again = run(threaded_fake, "caption", "photos", *BATCH_ARGS, "--jsonl", "captions.jsonl")
    assert again.exit_code == 0 and "0 done, 4 skipped, 0 failed, 0 batch jobs" in again.stderr
    assert len(threaded_fake.batches) == 1 and len(lines(tmp_path / "captions.jsonl")) == 4
    quiet = run(threaded_fake, "caption", "photos", *BATCH_ARGS, "--jsonl", "captions.jsonl", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_detect_point_count_match_scene_truth(threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path) -> None:
    boxes = run(threaded_fake, "detect", "shapes", "photos", *BATCH_ARGS, "--jsonl", "out.jsonl")
    points = run(threaded_fake, "point", "circles", "photos", *BATCH_ARGS, "--jsonl", "out.jsonl")
    counts = run(threaded_fake, "count", "circles", "photos", *BATCH_ARGS, "--jsonl", "out.jsonl", "--tiles", "never")
    assert (boxes.exit_code, points.exit_code, counts.exit_code) == (0, 0, 0), boxes.stderr + points.stderr
    records = lines(tmp_path / "out.jsonl")
    by_skill: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_skill.setdefault(record["skill"], []).append(record)
    assert {k: len(v) for k, v in by_skill.items()} == {"detect": 4, "point": 4, "count": 4}
    for record in by_skill["detect"]:
        assert record["arguments"] == {"object": "shapes", "batch": True}
        truth = sorted(t.bbox_px for t in photos[record["source"]].truth())
        found = sorted(o["box_px"] for o in record["objects"])
        assert record["count"] == len(truth) == 3 and record["tiles"] == 1 and record["capped"] is None
        assert all(near(box, want) for box, want in zip(found, truth)), (found, truth)
        for o in record["objects"]:
            assert near([o["x_min"] * 640, o["y_min"] * 480, o["x_max"] * 640, o["y_max"] * 480], o["box_px"], 0.01)
    for record in by_skill["point"]:
        centers = sorted((t.center[0] * 640, t.center[1] * 480) for t in photos[record["source"]].matching("circles"))
        found = sorted((p["x_px"], p["y_px"]) for p in record["points"])
        assert record["count"] == 2 and all(near(p, c) for p, c in zip(found, centers)), (found, centers)
    assert all(r["count"] == 2 and r["arguments"] == {"object": "circles", "batch": True} for r in by_skill["count"])
    skills = sorted(json.loads((d / "command.json").read_text())["batch_skill"]
                    for d in (tmp_path / "out.jsonl.batch").iterdir())
    assert skills == ["detect", "point", "point"], "count asks the Batch API for points"
    assert not [r for r in threaded_fake.requests if r.path.rsplit("/", 1)[-1] in ("detect", "point")], \
        "nothing went through the standard routes"


def test_bad_images_are_per_item_error_records(threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "photos/a0.jpg").read_bytes()[:2000])
    result = run(threaded_fake, "detect", "shapes", "photos/a1.jpg", "broken.jpg", "missing.jpg", "truncated.jpg",
                 *BATCH_ARGS, "--jsonl", "out.jsonl")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    records = {r["source"]: r for r in lines(tmp_path / "out.jsonl")}
    assert len(records) == 4 and len(lines(tmp_path / "out.jsonl")) == 4
    assert records["photos/a1.jpg"]["error"] is None and records["photos/a1.jpg"]["count"] == 3
    assert records["broken.jpg"]["image_id"] == sha256(tmp_path / "broken.jpg") and records["broken.jpg"]["error"]
    assert records["missing.jpg"]["image_id"] is None and "not found" in records["missing.jpg"]["error"]
    truncated = records["truncated.jpg"]  # its header reads; the job could not encode it, so never sent it
    assert truncated["width"] == 640 and "cannot decode image" in truncated["error"]
    assert "failed (3):" in result.stderr and "is not sent" not in result.stderr, "listed once, not also logged"
    (batch,) = threaded_fake.batches.values()
    assert batch.lines == 1, "only the readable image was sent"


def test_failed_batch_is_recorded_and_retry_failed_resubmits(
    threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path
) -> None:
    threaded_fake.batch_fail_next(code="processing_failed", message="the GPUs are on fire")
    failed = run(threaded_fake, "query", "What is blue?", "photos", *BATCH_ARGS, "--jsonl", "out.jsonl")
    assert failed.exit_code == 1 and "Traceback" not in failed.stderr
    records = lines(tmp_path / "out.jsonl")
    assert len(records) == 4 and all(r["error"].startswith("BatchFailedError: batch ") for r in records)
    assert all("the GPUs are on fire" in r["error"] for r in records)
    assert "--retry-failed submits them again" in failed.stderr

    kept = run(threaded_fake, "query", "What is blue?", "photos", *BATCH_ARGS, "--jsonl", "out.jsonl")
    assert kept.exit_code == 1 and "0 done, 4 skipped" in kept.stderr and len(threaded_fake.batches) == 1
    retried = run(threaded_fake, "query", "What is blue?", "photos", *BATCH_ARGS, "--jsonl", "out.jsonl", "--retry-failed")
    assert retried.exit_code == 0, retried.stderr
    assert "4 done, 0 skipped, 0 failed" in retried.stderr and len(threaded_fake.batches) == 2
    last = {r["source"]: r for r in lines(tmp_path / "out.jsonl")}
    assert len(lines(tmp_path / "out.jsonl")) == 8 and all(r["error"] is None and r["answer"] for r in last.values())
    assert sorted(p.name for p in (tmp_path / "out.jsonl.batch").iterdir()) == ["0001-query", "0002-query"]


def test_usage_errors_exit_2(threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path) -> None:
    cases = {
        ("segment", "blue square", "photos", "--batch-api", "--jsonl", "o.jsonl"):
            "the Batch API has no segment (only caption, query, detect, point and count): run segment without --batch-api",
        ("detect", "x", "photos", "--batch-api", "--backend", "fal", "--jsonl", "o.jsonl"): "not with --backend fal",
        ("caption", "photos", "--batch-api"): "--batch-api needs --jsonl",
        ("detect", "x", "photos", "--batch-api", "--jsonl", "o.jsonl", "--tiles", "3x4"): "--tiles 3x4 is not for",
        ("count", "x", "photos", "--batch-api", "--jsonl", "o.jsonl", "--tiles", "always"): "--tiles always",
        ("point", "x", "photos", "--batch-api", "--jsonl", "o.jsonl", "--max-objects", "5"): "--max-objects is not",
        ("caption", "photos", "--no-wait", "--jsonl", "o.jsonl"): "--no-wait is for --batch-api",
        ("detect", "x", "photos", "--batch-api", "--no-wait", "--jsonl", "o.jsonl", "--coco", "c.json"): "need the results",
    }
    for args, text in cases.items():
        result = run(threaded_fake, *args)
        assert result.exit_code == 2, (args, result.stderr)
        assert text in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not threaded_fake.requests and not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------- later: --no-wait, batch status, batch fetch


def test_no_wait_then_status_then_fetch(threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path) -> None:
    threaded_fake.batch_polls_to_complete = 3
    submitted = run(threaded_fake, "caption", "photos", *BATCH_ARGS, "--no-wait", "--jsonl", "captions.jsonl")
    assert submitted.exit_code == 0, submitted.stderr
    job = submitted.stdout.strip()
    assert job == os.path.join("captions.jsonl.batch", "0001-caption")
    (batch,) = threaded_fake.batches.values()
    assert batch.id in submitted.stderr and batch.polls == 0 and lines(tmp_path / "captions.jsonl") == []

    status = run(threaded_fake, "batch", "status", job)
    assert status.exit_code == 0 and f"{job}: moondream-tools caption --length normal (4 inputs): chunking" in status.stdout
    early = run(threaded_fake, "batch", "fetch", job, "--jsonl", "captions.jsonl")
    assert early.exit_code == 1 and "not finished (processing" in early.stderr and "nothing written" in early.stderr
    assert lines(tmp_path / "captions.jsonl") == []
    for _ in range(5):
        status = run(threaded_fake, "batch", "status", "captions.jsonl.batch")  # FILE.batch: all its jobs
        if "completed" in status.stdout:
            break
    assert "completed, 4 of 4 done, 0 failed" in status.stdout and "records: not written yet" in status.stdout
    assert "at the batch price" in status.stdout

    fetched = run(threaded_fake, "batch", "fetch", job, "--jsonl", "captions.jsonl")
    assert fetched.exit_code == 0, fetched.stderr
    assert "4 records written to captions.jsonl (0 failed), 0 already there" in fetched.stderr
    assert "Batch API tokens" in fetched.stderr
    records = lines(tmp_path / "captions.jsonl")
    assert sorted(r["source"] for r in records) == sorted(photos) and all(r["caption"] for r in records)
    assert "records: written to captions.jsonl" in run(threaded_fake, "batch", "status", job).stdout

    again = run(threaded_fake, "batch", "fetch", job)  # default: the command's --jsonl
    assert again.exit_code == 0 and "0 records written to captions.jsonl (0 failed), 4 already there" in again.stderr
    rerun = run(threaded_fake, "caption", "photos", *BATCH_ARGS, "--jsonl", "captions.jsonl")
    assert rerun.exit_code == 0 and "0 done, 4 skipped" in rerun.stderr
    assert len(lines(tmp_path / "captions.jsonl")) == 4 and len(threaded_fake.batches) == 1
    assert set(batch.downloads.values()) == {1} and len(batch.downloads) == len(batch.outputs), "each file once"
    assert batch.completes == 1


def test_fetch_of_an_expired_job_says_so(threaded_fake: FakeMoondream, photos: dict[str, Scene], tmp_path: Path) -> None:
    submitted = run(threaded_fake, "point", "circles", "photos", *BATCH_ARGS, "--no-wait", "--jsonl", "p.jsonl")
    assert submitted.exit_code == 0
    job = submitted.stdout.strip()
    (batch,) = threaded_fake.batches.values()
    for _ in range(3):
        run(threaded_fake, "batch", "status", job)
    threaded_fake.expire_batch(batch.id)
    fetched = run(threaded_fake, "batch", "fetch", job)
    assert fetched.exit_code == 1 and "BatchExpiredError" in fetched.stderr and "Traceback" not in fetched.stderr
    records = lines(tmp_path / "p.jsonl")
    assert len(records) == 4 and all(r["error"].startswith("BatchExpiredError") for r in records)
    wrong = run(threaded_fake, "batch", "status", "photos")
    assert wrong.exit_code == 2 and "photos holds no batch job" in wrong.stderr


# ---------------------------------------------------------------- a killed run resumes the same job


def test_killed_after_submit_rerun_resumes_the_same_job(
    threaded_fake: FakeMoondream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    scenes = make_photos(tmp_path, 6)
    threaded_fake.batch_polls_to_complete = 100_000
    args = ("detect", "shapes", "photos", "--batch-api", "--poll-interval", "0.02", "--jsonl", "out.jsonl")
    child = spawn(threaded_fake, tmp_path, *args)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            batch = next(iter(threaded_fake.batches.values()), None)
            if batch is not None and batch.polls >= 2:
                break
            time.sleep(0.01)
        assert batch is not None and batch.polls >= 2, "submitted and polling"
    finally:
        child.kill()
        child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert lines(tmp_path / "out.jsonl") == []
    parts = dict(batch.part_uploads)
    assert parts and batch.completes == 1

    batch.polls_to_complete = 0  # the service finishes the batch meanwhile
    threaded_fake.reset()
    rerun = spawn(threaded_fake, tmp_path, *args)
    _, stderr = rerun.communicate(timeout=30)
    assert rerun.returncode == 0, stderr
    assert len(threaded_fake.batches) == 1 and batch.completes == 1, "not submitted again"
    assert batch.part_uploads == parts and set(parts.values()) == {1}, "no part uploaded twice"
    assert not [r for r in threaded_fake.requests if r.method == "PUT" or "action" in r.query], "no upload"
    assert "resumed" in stderr and "6 done, 0 skipped, 0 failed, 1 batch job" in stderr
    records = lines(tmp_path / "out.jsonl")
    assert Counter(r["source"] for r in records) == Counter(list(scenes)), "every input exactly once"
    assert all(r["error"] is None and r["count"] == 3 for r in records)

    again = spawn(threaded_fake, tmp_path, *args)
    _, stderr = again.communicate(timeout=30)
    assert again.returncode == 0 and "0 done, 6 skipped" in stderr and len(lines(tmp_path / "out.jsonl")) == 6


def test_ctrl_c_while_waiting_leaves_the_job_to_the_service(
    threaded_fake: FakeMoondream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_photos(tmp_path, 3)
    threaded_fake.batch_polls_to_complete = 100_000
    args = ("caption", "photos", "--batch-api", "--poll-interval", "0.02", "--jsonl", "out.jsonl")
    child = spawn(threaded_fake, tmp_path, *args)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(b.polls >= 2 for b in threaded_fake.batches.values()):
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=20)
    assert child.returncode == 130, stderr
    assert "SIGINT: stopped: the batch job goes on in the service; rerun the same command" in stderr
    assert "Traceback" not in stderr and "0 done, 0 skipped, 0 failed, 1 batch job" in stderr
    (batch,) = threaded_fake.batches.values()
    batch.polls_to_complete = 0
    rerun = run(threaded_fake, *args)
    assert rerun.exit_code == 0, rerun.stderr
    assert "3 done, 0 skipped" in rerun.stderr and batch.completes == 1
