"""A LlamaIndex conversation resumed in a fresh process still resolves its image handles.

Two child processes (``python -W error``) play the two runs of an application over the same
state directory: an ``ImageStore`` directory and the chat history saved as JSON.

- Process A: ``MoondreamToolSpec(image_store=ImageStore(dir))``; the user's message holds the
  photo as an ``ImageBlock``; ``aattach_messages`` replaces it with its handle; a
  ``FunctionAgent`` with the scripted text-only LLM of test_li_attachments (it fails on any
  ``ImageBlock``) counts the red circles; the conversation (the rewritten message, the
  agent's tool calls, the tool results and its answer) is saved as JSON.
- The photo file is deleted.
- Process B: a new client, spec and store object over the same directory load the JSON
  history and ask, text only, how many blue squares; the LLM finds the handle in the history
  and calls count_objects with it; the handle resolves from the disk store.

Ground truth: the scene's shapes, the sha256 of the photo's bytes, the saved JSON, and the
requests the emulator (in a thread of this process) received.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock, ToolCallBlock
from moondream_tools.testing import FakeMoondream
from llama_index.test_li_attachments import SCENE, H, W, has_image, near

TESTS = Path(__file__).resolve().parents[1]

#: One run of the application; argv: step ("first" or "resume"), base URL, API key, state dir.
#: Prints one line: REPORT <json>.
CHILD = r'''
import asyncio
import hashlib
import json
import sys
import warnings
from pathlib import Path

from pydantic.warnings import PydanticDeprecationWarning

# llama-index workflows read pydantic's deprecated attributes through inspect (harmless).
warnings.filterwarnings("ignore", category=PydanticDeprecationWarning, module="inspect")

from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from llama_index.core.memory import Memory
from sqlalchemy.ext.asyncio import create_async_engine

from llama_index.tools.moondream import MoondreamToolSpec
from moondream_tools import AsyncMoondream, CountResult, ImageStore
from llama_index.test_li_attachments import agent_for, run_turn, text_only_llm

step, base_url, api_key, state = sys.argv[1:5]
state = Path(state)


def dump(messages):
    return [m.model_dump(mode="json") for m in messages]


async def main():
    store = ImageStore(state / "images")
    engine = create_async_engine("sqlite+aiosqlite:///:memory:")
    report = {"stored_before": store.names}
    try:
        async with AsyncMoondream(api_key=api_key, base_url=base_url) as md:
            spec = MoondreamToolSpec(md, image_store=store)
            if step == "first":
                photo = (state / "photo.jpg").read_bytes()
                message = ChatMessage(
                    role=MessageRole.USER,
                    blocks=[TextBlock(text="How many red circles are in this photo?"), ImageBlock(image=photo, image_mimetype="image/jpeg")],
                )
                user_msg, history = await spec.aattach_messages(message)
            else:
                saved = [ChatMessage.model_validate(m) for m in json.loads((state / "history.json").read_text())]
                user_msg, history = await spec.aattach_messages("How many blue squares are there?", saved)
                report["history_unchanged"] = all(a is b for a, b in zip(history, saved, strict=True))
            llm, record = text_only_llm()
            memory = Memory.from_defaults(session_id="chat-1", async_engine=engine)
            results, answer = await run_turn(agent_for(spec, llm), user_msg, memory=memory, chat_history=history)
            conversation = await memory.aget_all()
            report.update(
                restored=len(history),
                calls=record.calls,
                results=[
                    {
                        "tool": r.tool_name,
                        "kwargs": r.tool_kwargs,
                        "error": r.tool_output.is_error,
                        "text": r.tool_output.content,
                        # (a failed call's raw output is its error, not a CountResult)
                        **(
                            {
                                "count": r.tool_output.raw_output.count,
                                "image": r.tool_output.raw_output.image,
                                "size": list(r.tool_output.raw_output.image_size.as_tuple()),
                            }
                            if isinstance(r.tool_output.raw_output, CountResult)
                            else {"count": None, "image": None, "size": None}
                        ),
                    }
                    for r in results
                ],
                answer=answer,
                inputs=[dump(given) for given in record.inputs],
            )
            (state / "history.json").write_text(json.dumps(dump(conversation)))
        report["stored_after"] = {h: hashlib.sha256(store.get(h)).hexdigest() for h in store.names}
    finally:
        store.close()
        await engine.dispose()
    print("REPORT " + json.dumps(report))


asyncio.run(main())
'''


def run_process(script: Path, step: str, fake: FakeMoondream, state: Path) -> dict[str, Any]:
    """Run one fresh ``python -W error`` process; it must exit cleanly and print nothing else."""
    # With tests/ on the path, tests/llama_index is a portion of the llama_index namespace
    # package (as under pytest, consider_namespace_packages): llama_index.test_li_attachments.
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    done = subprocess.run(
        [sys.executable, "-W", "error", str(script), step, fake.base_url, fake.api_key, str(state)],
        capture_output=True, text=True, env=env, timeout=120, cwd=state,
    )
    assert done.returncode == 0 and done.stderr == "", f"{step}: exit {done.returncode}\n{done.stderr[-4000:]}"
    [line] = done.stdout.splitlines()
    assert line.startswith("REPORT ")
    return json.loads(line.removeprefix("REPORT "))


def holds_photo(text: str, jpeg: bytes) -> bool:
    """Whether ``text`` holds any part of the photo's base64 (a data URL, or a slice of it
    from anywhere in it)."""
    b64 = base64.b64encode(jpeg).decode()
    step = len(b64) // 16
    return "base64," in text or any(b64[i : i + 40] in text for i in range(0, len(b64) - 40, step))


def messages(dumped: list[dict[str, Any]]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in dumped]


def check_count(report: dict[str, Any], handle: str, phrase: str) -> None:
    """The LLM called count_objects once, on ``handle``, and the tool found the scene's truth."""
    assert report["calls"] == [["count_objects", {"image": handle, "object": phrase}]]
    [result] = report["results"]
    n = SCENE.count(phrase)
    assert result["tool"] == "count_objects" and result["kwargs"] == {"image": handle, "object": phrase}
    assert not result["error"], result["text"]
    assert result["count"] == n > 0
    assert result["image"] == handle and result["size"] == [W, H]
    truths = sorted(SCENE.matching(phrase), key=lambda t: (t.center[1], t.center[0]))
    positions = [(int(x), int(y)) for x, y in re.findall(r"#\d+ at \((\d+), (\d+)\)", result["text"])]
    assert len(positions) == n
    assert all(near(p, t.center) for p, t in zip(positions, truths, strict=True)), (positions, truths)
    assert result["text"] in report["answer"]


def test_a_new_process_resumes_the_saved_history_and_resolves_the_handle(
    threaded_fake: FakeMoondream, tmp_path: Path
) -> None:
    jpeg = SCENE.encode()
    handle = "img_" + hashlib.sha256(jpeg).hexdigest()[:8]
    placeholder = f"[image {handle}: {W}x{H} px]"
    script = tmp_path / "chat_app.py"
    script.write_text(CHILD)
    (tmp_path / "photo.jpg").write_bytes(jpeg)
    saved = tmp_path / "history.json"

    # ---- process A: the photo, counted by handle
    first = run_process(script, "first", threaded_fake, tmp_path)
    assert first["stored_before"] == [] and first["restored"] == 0
    assert first["stored_after"] == {handle: hashlib.sha256(jpeg).hexdigest()}, "the store holds the photo's own bytes"
    check_count(first, handle, "red circle")
    # The LLM's first input ends with the rewritten message: the question and the placeholder.
    shown = messages(first["inputs"][0])
    assert [(type(b), b.text) for b in shown[-1].blocks] == [
        (TextBlock, "How many red circles are in this photo?"),
        (TextBlock, placeholder),
    ]
    assert not any(has_image(messages(given)) for given in first["inputs"])

    # The saved history: the rewritten message, the tool call, its result and the answer;
    # no image block, no base64 of the photo (the check sees it in a message that holds it).
    text = saved.read_text()
    history = messages(json.loads(text))
    assert [m.role for m in history] == [MessageRole.USER, MessageRole.ASSISTANT, MessageRole.TOOL, MessageRole.ASSISTANT]
    assert placeholder in (history[0].content or "")
    [call] = [b for b in history[1].blocks if isinstance(b, ToolCallBlock)]
    assert call.tool_name == "count_objects" and call.tool_kwargs == {"image": handle, "object": "red circle"}
    assert history[2].content == first["results"][0]["text"] and history[3].content == first["answer"]
    assert not has_image(history) and not holds_photo(text, jpeg)
    unattached = ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(image=jpeg, image_mimetype="image/jpeg")])
    assert holds_photo(json.dumps(unattached.model_dump(mode="json")), jpeg)

    # The photo is gone: process B can only get it from the image store.
    (tmp_path / "photo.jpg").unlink()

    # ---- process B: a text-only follow-up over the saved history
    second = run_process(script, "resume", threaded_fake, tmp_path)
    assert second["stored_before"] == [handle] and second["restored"] == 4
    assert second["history_unchanged"], "a history without images is passed on as it is"
    check_count(second, handle, "blue square")
    # What the LLM was shown, every call: text only (it would have raised on an image block;
    # checked again here), with A's placeholder in the restored history.
    inputs = [messages(given) for given in second["inputs"]]
    assert len(inputs) == 2 and not any(has_image(given) for given in inputs)
    assert not any(holds_photo(json.dumps(given), jpeg) for given in second["inputs"])
    assert any(placeholder in (m.content or "") for m in inputs[0])
    assert inputs[0][-1].role == MessageRole.USER and inputs[0][-1].content == "How many blue squares are there?"
    assert second["stored_after"] == {handle: hashlib.sha256(jpeg).hexdigest()}

    # The emulator counted in the photo both times; B's history now holds both turns.
    points = [r.json for r in threaded_fake.requests if r.path == "/v1/point"]
    assert [p["object"] for p in points] == ["red circle", "blue square"]
    after = messages(json.loads(saved.read_text()))
    assert len(after) == 8 and not has_image(after) and not holds_photo(saved.read_text(), jpeg)
