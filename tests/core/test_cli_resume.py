"""Resuming ``moondream-tools`` runs: reruns, ``--retry-failed``, kills and signals.

Kills and signals use real subprocesses (``python -m moondream_tools.cli``) against the
emulator with a latency, so that requests are in flight when the signal lands. Ground
truth: the lines of the JSON Lines file (each a complete record, one per input and key),
the requests the emulator recorded, the exit status and the summary on stderr.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from moondream_tools.cli.app import cli
from moondream_tools.cli.records import FileBusyError, JsonlWriter, load_jsonl, record_key
from moondream_tools.testing import FakeMoondream, Scene

SKILL_PATHS = ("caption", "query", "detect", "point", "segment")


def make_images(root: Path, count: int) -> list[str]:
    (root / "photos").mkdir()
    sources = []
    for i in range(count):
        name = f"photos/img{i:02d}.jpg"
        (root / name).write_bytes(Scene.random(100 + i, width=320, height=240, count=2).encode("JPEG", 90))
        sources.append(name)
    return sources


def run(fake: FakeMoondream, *args: str) -> Result:
    env = {"MOONDREAM_BASE_URL": fake.base_url, "MOONDREAM_API_KEY": fake.api_key}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def spawn(fake: FakeMoondream, cwd: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "MOONDREAM_BASE_URL": fake.base_url, "MOONDREAM_API_KEY": fake.api_key or ""}
    return subprocess.Popen(
        [sys.executable, "-m", "moondream_tools.cli", *args], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def complete_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of ``path``, each of which must be a whole record."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "a partial last line"
    return [json.loads(line) for line in data.decode().splitlines()]


def wait_for_lines(path: Path, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {count} lines")


def keys(records: list[dict[str, Any]]) -> Counter[str]:
    return Counter(record_key(r["source"], r["skill"], r["arguments"]) for r in records)


def skill_requests(fake: FakeMoondream) -> list[Any]:
    return [r for r in fake.requests if r.path.rsplit("/", 1)[-1] in SKILL_PATHS]


@pytest.fixture
def images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.chdir(tmp_path)
    return make_images(tmp_path, 6)


def test_rerun_sends_nothing_and_adds_no_lines(threaded_fake: FakeMoondream, images: list[str], tmp_path: Path) -> None:
    first = run(threaded_fake, "detect", "shapes", "photos", "--jsonl", "out.jsonl")
    assert first.exit_code == 0 and first.stdout == ""
    before = (tmp_path / "out.jsonl").read_bytes()
    sent = len(skill_requests(threaded_fake))
    again = run(threaded_fake, "detect", "shapes", "photos", "--jsonl", "out.jsonl")
    assert again.exit_code == 0
    assert len(skill_requests(threaded_fake)) == sent == 6
    assert (tmp_path / "out.jsonl").read_bytes() == before
    assert "0 done, 6 skipped, 0 failed, 0 requests" in again.stderr
    other = run(threaded_fake, "detect", "circles", "photos", "--jsonl", "out.jsonl")  # other arguments: new keys
    assert "6 done, 0 skipped" in other.stderr and len(complete_lines(tmp_path / "out.jsonl")) == 12


def test_retry_failed_redoes_only_the_failed(threaded_fake: FakeMoondream, images: list[str], tmp_path: Path) -> None:
    threaded_fake.fail_next(status=400, route="/v1/caption")  # not retried: the first input fails
    first = run(threaded_fake, "caption", "photos", "--jsonl", "out.jsonl", "--concurrency", "1")
    assert first.exit_code == 1
    records = complete_lines(tmp_path / "out.jsonl")
    assert [r["error"] is not None for r in records] == [True] + [False] * 5
    assert "BadRequestError" in records[0]["error"] and f"  {images[0]}: BadRequestError" in first.stderr

    kept = run(threaded_fake, "caption", "photos", "--jsonl", "out.jsonl")
    assert kept.exit_code == 1 and "1 failed (1 recorded earlier: --retry-failed redoes them)" in kept.stderr
    threaded_fake.reset()
    retried = run(threaded_fake, "caption", "photos", "--jsonl", "out.jsonl", "--retry-failed")
    assert retried.exit_code == 0, retried.stderr
    assert len(skill_requests(threaded_fake)) == 1
    records = complete_lines(tmp_path / "out.jsonl")
    assert len(records) == 7 and records[-1]["source"] == images[0] and records[-1]["error"] is None
    last = load_jsonl(tmp_path / "out.jsonl").records
    assert len(last) == 6 and all(r["error"] is None for r in last.values())


def test_partial_last_line_is_repaired(threaded_fake: FakeMoondream, images: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    assert run(threaded_fake, "count", "shapes", "photos", "--jsonl", "out.jsonl").exit_code == 0
    whole = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(whole[:-1]) + whole[-1][:37])  # killed while writing the last record
    threaded_fake.reset()
    rerun = run(threaded_fake, "count", "shapes", "photos", "--jsonl", "out.jsonl")
    assert rerun.exit_code == 0
    assert "ended with an unfinished line (37 bytes" in rerun.stderr and "1 done, 5 skipped" in rerun.stderr
    records = complete_lines(out)
    assert len(records) == 6 and set(keys(records).values()) == {1}
    assert [r["source"] for r in records][-1] == json.loads(whole[-1])["source"]
    assert len(skill_requests(threaded_fake)) == 1


def test_one_writer_per_file(tmp_path: Path) -> None:
    with JsonlWriter(tmp_path / "out.jsonl"):
        with pytest.raises(FileBusyError, match="another moondream-tools run"):
            JsonlWriter(tmp_path / "out.jsonl")
    JsonlWriter(tmp_path / "out.jsonl").close()  # free again


def test_sigkill_mid_run_then_rerun_records_every_input_once(threaded_fake: FakeMoondream, tmp_path: Path) -> None:
    sources = make_images(tmp_path, 16)
    out = tmp_path / "out.jsonl"
    threaded_fake.latency = 0.3
    child = spawn(threaded_fake, tmp_path, "detect", "shapes", "photos", "--jsonl", "out.jsonl", "--concurrency", "4")
    try:
        wait_for_lines(out, 4)
        deadline = time.monotonic() + 5
        while threaded_fake.in_flight == 0 and time.monotonic() < deadline:  # kill it mid-request
            time.sleep(0.005)
        assert threaded_fake.in_flight > 0, "requests are in flight when the process is killed"
    finally:
        child.kill()
        child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL
    killed = complete_lines(out)
    assert 4 <= len(killed) < 16 and set(keys(killed).values()) == {1}
    assert [r["source"] for r in killed] == sources[: len(killed)], "written in input order"

    threaded_fake.latency = 0.0
    threaded_fake.reset()
    rerun = spawn(threaded_fake, tmp_path, "detect", "shapes", "photos", "--jsonl", "out.jsonl")
    _, stderr = rerun.communicate(timeout=30)
    assert rerun.returncode == 0, stderr
    records = complete_lines(out)
    assert sorted(r["source"] for r in records) == sources and set(keys(records).values()) == {1}
    assert all(r["error"] is None for r in records)
    assert len(skill_requests(threaded_fake)) == 16 - len(killed)
    assert f"{16 - len(killed)} done, {len(killed)} skipped" in stderr


def test_sigterm_finishes_in_flight_and_exits_143(threaded_fake: FakeMoondream, tmp_path: Path) -> None:
    sources = make_images(tmp_path, 12)
    out = tmp_path / "out.jsonl"
    threaded_fake.latency = 0.4
    child = spawn(threaded_fake, tmp_path, "caption", "photos", "--jsonl", "out.jsonl", "--concurrency", "3")
    wait_for_lines(out, 3)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=20)
    assert child.returncode == 143, stderr
    assert "SIGTERM: starting no new inputs" in stderr and "Traceback" not in stderr
    records = complete_lines(out)
    assert "moondream-tools caption: " in stderr and f"{len(records)} done, 0 skipped" in stderr
    assert all(r["error"] is None for r in records), "the inputs in flight were finished, not cut off"
    assert len(skill_requests(threaded_fake)) == len(records), "every request sent was recorded"
    assert len(records) < 12 and "not started" in stderr

    threaded_fake.latency = 0.0
    rerun = spawn(threaded_fake, tmp_path, "caption", "photos", "--jsonl", "out.jsonl")
    rerun.communicate(timeout=30)
    assert rerun.returncode == 0
    assert sorted(r["source"] for r in complete_lines(out)) == sources


def test_second_sigint_cancels_in_flight_and_exits_130(threaded_fake: FakeMoondream, tmp_path: Path) -> None:
    make_images(tmp_path, 8)
    out = tmp_path / "out.jsonl"
    threaded_fake.latency = 0.2
    child = spawn(threaded_fake, tmp_path, "detect", "shapes", "photos", "--jsonl", "out.jsonl", "--concurrency", "2",
                  "--coco", "never.json")
    wait_for_lines(out, 2)
    threaded_fake.latency = 5.0  # what is in flight now stays in flight
    time.sleep(0.3)
    child.send_signal(signal.SIGINT)
    time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=20)
    assert child.returncode == 130, stderr
    assert "cancelling the inputs in flight" in stderr and "exports skipped" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "never.json").exists()
    records = complete_lines(out)
    assert 2 <= len(records) < 8 and all(r["error"] is None for r in records)
