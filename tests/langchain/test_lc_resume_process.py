"""A conversation resumed in a fresh process still resolves its image handles.

Two child processes (``python -W error``) play the two runs of an application over the same
state directory: one ``ImageStore`` directory and one ``SqliteSaver`` checkpoint file.

- Process A: ``create_agent`` with ``MoondreamImageMiddleware`` and the scripted text-only
  model of test_lc_middleware (it fails on any image block); the user sends the photo (a
  base64 image block) and asks how many red circles; the turn runs with
  ``durability="exit"``, so no checkpoint is written before the middleware replaced the photo.
- The photo file is deleted.
- Process B: a new client, toolkit, store object and saver over the same directory and file,
  the same thread; the user asks, text only, how many blue squares. The model finds the
  handle in the restored history and calls count_objects with it; the handle resolves from
  the disk store.

Ground truth: the scene's shapes, the sha256 of the photo's bytes, the checkpoint file's
bytes, and the requests the emulator (in a thread of this process) received.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage, messages_from_dict
from langgraph.checkpoint.sqlite import SqliteSaver
from moondream_tools.testing import FakeMoondream
from test_lc_middleware import assert_text_only, no_base64, state_json

from lc_support import SCENE, H, W, centers, close

TESTS = Path(__file__).resolve().parents[1]
THREAD = "chat-1"

#: One run of the application; argv: step ("first" or "resume"), base URL, API key, state dir.
#: Prints one line: REPORT <json>.
CHILD = r'''
import asyncio
import base64
import hashlib
import json
import sys
from pathlib import Path

from langchain_core.messages import AIMessage, HumanMessage, messages_to_dict
from langgraph.checkpoint.sqlite import SqliteSaver
from moondream_tools import AsyncMoondream, ImageStore

from langchain_moondream import MoondreamToolkit
from test_lc_middleware import agent_for, artifact_field, config, counting_model, tool_messages

step, base_url, api_key, state = sys.argv[1:5]
state = Path(state)


def turn(toolkit, checkpoint_file, message, **run):
    """One turn with a new text-only model; what it did, and what the model was shown."""
    model = counting_model()
    with SqliteSaver.from_conn_string(str(checkpoint_file)) as saver:
        agent = agent_for(model, toolkit, checkpointer=saver)
        before = len(agent.get_state(config("chat-1")).values.get("messages", []))
        result = agent.invoke({"messages": [message]}, config("chat-1"), **run)
    new = result["messages"][before:]
    [counted] = tool_messages(new, "count_objects")
    return {
        "restored": before,
        "tool_calls": [call for m in new if isinstance(m, AIMessage) for call in m.tool_calls],
        "count_text": counted.text,
        "count_status": counted.status,
        "count": artifact_field(counted, "count"),
        "answer": result["messages"][-1].text,
        "seen": [messages_to_dict(given) for given in model.seen],
    }


async def close(client):
    await client.aclose()


client = AsyncMoondream(api_key=api_key, base_url=base_url)
store = ImageStore(state / "images")
try:
    report = {"stored_before": store.names}
    toolkit = MoondreamToolkit(backend=client, image_store=store)
    if step == "first":
        photo = (state / "photo.jpg").read_bytes()
        block = {"type": "image", "base64": base64.b64encode(photo).decode(), "mime_type": "image/jpeg"}
        ask = lambda: HumanMessage([{"type": "text", "text": "How many red circles?"}, block], id="photo-1")
        report["turn"] = turn(toolkit, state / "checkpoints.sqlite", ask(), durability="exit")
        # The control: the same turn with the default durability, on a file of its own.
        report["control"] = turn(toolkit, state / "control.sqlite", ask())
    else:
        report["turn"] = turn(toolkit, state / "checkpoints.sqlite", HumanMessage("And how many blue squares?", id="follow-up"))
    report["stored_after"] = {h: hashlib.sha256(store.get(h)).hexdigest() for h in store.names}
finally:
    store.close()
    asyncio.run(close(client))
print("REPORT " + json.dumps(report))
'''


def run_process(script: Path, step: str, fake: FakeMoondream, state: Path) -> dict[str, Any]:
    """Run one fresh ``python -W error`` process; it must exit cleanly and print nothing else."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS / "langchain")])}
    done = subprocess.run(
        [sys.executable, "-W", "error", str(script), step, fake.base_url, fake.api_key, str(state)],
        capture_output=True, text=True, env=env, timeout=120, cwd=state,
    )
    assert done.returncode == 0 and done.stderr == "", f"{step}: exit {done.returncode}\n{done.stderr[-4000:]}"
    [line] = done.stdout.splitlines()
    assert line.startswith("REPORT ")
    return json.loads(line.removeprefix("REPORT "))


def file_bytes(database: Path) -> bytes:
    """The SQLite file with its write-ahead log and shared-memory file, if any are left."""
    return b"".join(path.read_bytes() for path in sorted(database.parent.glob(database.name + "*")))


def holds_photo(data: bytes, jpeg: bytes) -> bool:
    """Whether ``data`` holds any part of the photo: a data URL, a slice of its base64 from
    anywhere in it, or a slice of its raw bytes."""
    b64 = base64.b64encode(jpeg)
    step = len(b64) // 16
    pieces = [b64[i : i + 40] for i in range(0, len(b64) - 40, step)]
    pieces += [jpeg[i : i + 40] for i in range(0, len(jpeg) - 40, len(jpeg) // 16)]
    return b"base64," in data or any(piece in data for piece in pieces)


def check_count(turn: dict[str, Any], handle: str, phrase: str) -> None:
    """The model called count_objects once, on ``handle``, and got the scene's truth."""
    assert turn["tool_calls"] == [
        {"name": "count_objects", "args": {"image": handle, "object": phrase}, "id": "call_0_0", "type": "tool_call"}
    ]
    n = SCENE.count(phrase)
    assert turn["count_status"] == "success" and turn["count"] == n > 0
    assert turn["count_text"].startswith(f'Counted {n} "{phrase}" in {handle} ({W}x{H} px)'), turn["count_text"]
    truths = sorted(SCENE.matching(phrase), key=lambda t: t.center[0])
    found = centers(turn["count_text"])
    assert len(found) == n
    for (x, y), truth in zip(found, truths, strict=True):
        assert close(x, truth.center[0] * W, W) and close(y, truth.center[1] * H, H)
    assert turn["answer"] == f"{phrase}: {n}"


def test_a_new_process_resumes_the_checkpointed_thread_and_resolves_the_handle(
    threaded_fake: FakeMoondream, tmp_path: Path
) -> None:
    jpeg = SCENE.encode()
    handle = "img_" + hashlib.sha256(jpeg).hexdigest()[:8]
    placeholder = f"[image {handle}: {W}x{H} px]"
    script = tmp_path / "chat_app.py"
    script.write_text(CHILD)
    (tmp_path / "photo.jpg").write_bytes(jpeg)
    checkpoints = tmp_path / "checkpoints.sqlite"

    # ---- process A: the photo, counted by handle
    first = run_process(script, "first", threaded_fake, tmp_path)
    turn = first["turn"]
    assert first["stored_before"] == [] and turn["restored"] == 0
    assert first["stored_after"] == {handle: hashlib.sha256(jpeg).hexdigest()}, "the store holds the photo's own bytes"
    # The model's first input: the photo's message, rewritten to its placeholder.
    assert len(turn["seen"]) == 2
    [human] = messages_from_dict(turn["seen"][0])
    assert human.id == "photo-1" and human.content == [
        {"type": "text", "text": "How many red circles?"},
        {"type": "text", "text": placeholder},
    ]
    check_count(turn, handle, "red circle")
    # durability="exit": the checkpoint file never held the photo, in any row, log or page.
    assert checkpoints.is_file() and not holds_photo(file_bytes(checkpoints), jpeg)
    # The control shows the check can see it: with the default durability the thread's
    # history keeps the checkpoint of the turn's input, which holds the raw photo.
    check_count(first["control"], handle, "red circle")
    assert holds_photo(file_bytes(tmp_path / "control.sqlite"), jpeg)

    # The photo is gone: process B can only get it from the image store.
    (tmp_path / "photo.jpg").unlink()
    (tmp_path / "control.sqlite").unlink()

    # ---- process B: a text-only follow-up in the same thread
    second = run_process(script, "resume", threaded_fake, tmp_path)
    turn = second["turn"]
    assert second["stored_before"] == [handle] and turn["restored"] == 4
    check_count(turn, handle, "blue square")
    # What the model was shown, every call: the restored history, text only (the model
    # would have raised on an image block; checked again here), the placeholder in it.
    seen = [messages_from_dict(given) for given in turn["seen"]]
    assert len(seen) == 2
    for given in seen:
        assert_text_only(given)
    first_input = seen[0]
    assert [type(m).__name__ for m in first_input] == [
        "HumanMessage", "AIMessage", "ToolMessage", "AIMessage", "HumanMessage"
    ]
    assert first_input[0].id == "photo-1" and first_input[0].content[1] == {"type": "text", "text": placeholder}
    assert first_input[-1].id == "follow-up" and first_input[-1].text == "And how many blue squares?"
    assert second["stored_after"] == {handle: hashlib.sha256(jpeg).hexdigest()}

    # The emulator counted in the photo both times (A's turn, A's control, B's turn).
    points = [r.json for r in threaded_fake.requests if r.path == "/v1/point"]
    assert [p["object"] for p in points] == ["red circle", "red circle", "blue square"]

    # ---- the checkpoint file after both processes
    assert not holds_photo(file_bytes(checkpoints), jpeg)
    with SqliteSaver.from_conn_string(str(checkpoints)) as saver:
        thread = {"configurable": {"thread_id": THREAD}}
        latest = saver.get_tuple(thread)
        history = list(saver.list(thread))
    assert latest is not None
    messages = latest.checkpoint["channel_values"]["messages"]
    assert [type(m) for m in messages] == [HumanMessage, AIMessage, ToolMessage, AIMessage] * 2
    assert messages[0].id == "photo-1" and messages[0].content[1] == {"type": "text", "text": placeholder}
    assert [m.text for m in messages if isinstance(m, ToolMessage)] == [
        first["turn"]["count_text"], turn["count_text"]
    ]
    assert no_base64(state_json(messages))
    # Every checkpoint in the thread's history: A's one (at exit) and B's steps.
    assert len(history) > 1 and history[0].checkpoint["id"] == latest.checkpoint["id"]
    for saved in history:
        assert no_base64(state_json(saved.checkpoint["channel_values"].get("messages", [])))
