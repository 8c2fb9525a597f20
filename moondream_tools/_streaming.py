"""Streaming: server-sent-events decoding, :class:`Stream`, and the per-skill event converters.

The transport (:mod:`moondream_tools._transport`) opens the HTTP response and retries until
the first event; this module turns the bytes of an SSE body into JSON events
(:func:`decode_sse`) and each skill's events into what a caller iterates: text pieces for
caption, query and chat, typed events for segmentation (:class:`SegmentStreamState`).

Example::

    async with md.stream_caption("photo.jpg") as stream:
        async for piece in stream:
            print(piece, end="")
    print(stream.request_id)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, Generic, Protocol, TypeVar

from .errors import ResponseError
from .results import (
    Box,
    ImageSize,
    SegmentBBoxEvent,
    SegmentEvent,
    SegmentFinalEvent,
    Segmentation,
    SegmentPathDeltaEvent,
    parse_result,
)

__all__ = [
    "DONE",
    "EventConverter",
    "SegmentStreamState",
    "Stream",
    "chat_events",
    "decode_sse",
    "text_events",
]

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)

#: The event :func:`decode_sse` yields for OpenAI's ``data: [DONE]`` terminator.
DONE: dict[str, Any] = {"__done__": True}


class Stream(Generic[_T]):
    """An async iterator over a streamed answer that closes its response when done.

    Iterate it with ``async for``; ``request_id`` is set as soon as the server sends it and
    ``completed`` once the final event arrived. Leaving the loop early does not read the
    rest: call :meth:`aclose` (or use ``async with``) to close the response at once.

    Example::

        async with md.stream_caption("photo.jpg") as stream:
            async for piece in stream:
                print(piece, end="")
        print(stream.request_id)
    """

    def __init__(self, open_events: Callable[[Stream[_T]], AsyncIterator[_T]]) -> None:
        self.request_id: str | None = None
        self.completed = False
        self._iterator = open_events(self)

    def __aiter__(self) -> Stream[_T]:
        return self

    async def __anext__(self) -> _T:
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        """Stop streaming and close the HTTP response."""
        aclose = getattr(self._iterator, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> Stream[_T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class EventConverter(Protocol[_T_co]):
    """Maps one JSON event of a stream to ``(items to yield, whether the stream is done)``."""

    def __call__(self, stream: Stream[Any], event: dict[str, Any]) -> tuple[list[_T_co], bool]: ...


async def decode_sse(
    lines: AsyncIterable[bytes], route: str, redact: Callable[[str], str], stream: Stream[Any]
) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a server-sent-events body, one per ``data:`` line.

    ``data: [DONE]`` yields :data:`DONE` and ends. An event's ``request_id`` is recorded on
    ``stream``. A line that is not JSON, or JSON that is not an object, is a
    :class:`ResponseError` (its text redacted with ``redact``).
    """
    async for line in lines:
        text = line.decode("utf-8", "replace").strip()
        if not text.startswith("data:"):
            continue
        data_text = text[5:].strip()
        if data_text == "[DONE]":
            yield DONE
            return
        try:
            event = json.loads(data_text)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            raise ResponseError(
                f"{route}: malformed event in stream: {redact(data_text)[:80]!r}", request_id=stream.request_id
            ) from None
        if not isinstance(event, dict):
            raise ResponseError(f"{route}: stream event is not a JSON object", request_id=stream.request_id)
        if isinstance(event.get("request_id"), str):
            stream.request_id = event["request_id"]
        yield event


def text_events(stream: Stream[str], event: dict[str, Any]) -> tuple[list[str], bool]:
    """Caption/query events: ``{"chunk": ...}`` (or ``"text"``) then ``{"completed": true}``."""
    piece = event.get("chunk", event.get("text"))
    items = [piece] if isinstance(piece, str) and piece else []
    return items, bool(event.get("__done__") or event.get("completed"))


def chat_events(stream: Stream[str], event: dict[str, Any]) -> tuple[list[str], bool]:
    """OpenAI chat chunks: ``choices[0].delta.content`` pieces, then ``[DONE]``."""
    if event.get("__done__"):
        return [], True
    if isinstance(event.get("id"), str) and stream.request_id is None:
        stream.request_id = event["id"]
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return [], False
    delta = choices[0].get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return ([content] if isinstance(content, str) and content else []), False


class SegmentStreamState:
    """The state of one segmentation stream: the image size, the first bbox, the coarse path.

    Moondream streams ``{"type": "bbox"}``, then ``{"type": "path_delta", "chunk"}`` pieces
    of a coarse path, then ``{"type": "final", "path", "bbox"}``. Each path delta is turned
    into a partial :class:`Segmentation` of everything received so far.

    Example::

        state = SegmentStreamState("car")
        state.image_size = prepared.size
        stream = Stream(lambda s: ...)            # the transport calls state.convert per event
    """

    def __init__(self, object: str) -> None:
        self.object = object
        self.image_size: ImageSize | None = None
        self.bbox: Box | None = None
        self._coarse: list[str] = []

    @property
    def coarse_path(self) -> str:
        """The coarse path received so far."""
        return "".join(self._coarse)

    def convert(self, stream: Stream[SegmentEvent], event: dict[str, Any]) -> tuple[list[SegmentEvent], bool]:
        """An :class:`EventConverter` for the ``/segment`` stream."""
        kind = event.get("type")
        rid = stream.request_id
        if kind == "bbox":
            bbox = parse_result(SegmentBBoxEvent, event, what="/segment stream", request_id=rid,
                                image_size=self.image_size)
            if self.bbox is None:
                self.bbox = bbox.bbox
            return [bbox], False
        if kind == "path_delta":
            chunk = event.get("chunk")
            if not isinstance(chunk, str):
                raise ResponseError("/segment stream: path_delta without a text chunk", request_id=rid)
            if not chunk:
                return [], False
            self._coarse.append(chunk)
            partial = Segmentation(
                path=self.coarse_path, bbox=self.bbox, object=self.object, partial=True,
                image_size=self.image_size, request_id=rid,
            )
            return [SegmentPathDeltaEvent(chunk=chunk, segmentation=partial)], False
        if kind == "final":
            seg = parse_result(Segmentation, event, what="/segment stream", request_id=rid,
                               image_size=self.image_size, object=self.object)
            return [SegmentFinalEvent(segmentation=seg)], True
        if event.get("__done__"):
            raise ResponseError("/segment stream: ended without a final event", request_id=rid)
        return [], False
