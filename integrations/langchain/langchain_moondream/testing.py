"""Test agents offline: a chat model that replays a script of tool calls and answers.

Pair it with the Moondream emulator (:class:`moondream_tools.testing.FakeMoondream`) and a
synthetic :class:`moondream_tools.testing.Scene` to run a real LangChain agent end to end
without any key or network.

Example:
    >>> from langchain_core.messages import HumanMessage
    >>> model = ScriptedChatModel(steps=[
    ...     [{"name": "count_objects", "args": {"image": "img_1", "object": "cat"}}],
    ...     lambda messages: f"The tool said: {messages[-1].content}",
    ... ])
    >>> first = model.bind_tools([]).invoke([HumanMessage("How many cats?")])
    >>> first.tool_calls[0]["name"], first.tool_calls[0]["id"]
    ('count_objects', 'call_0_0')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import BaseTool

__all__ = ["ScriptedChatModel", "Step"]

#: One turn of the script: a message, a plain answer, a list of tool calls
#: (``{"name": ..., "args": {...}}``), or a function of the conversation so far returning
#: one of those (e.g. one that reads the last tool result to decide the next call).
Step = AIMessage | str | list[dict[str, Any]] | Callable[[list[BaseMessage]], Any]


class ScriptedChatModel(BaseChatModel):
    """A chat model that plays ``steps`` in order, one per model turn, for offline tests.

    The turn is the number of AI messages since the last human message, so the model holds
    no state: the same instance runs any number of conversations, sync or async.
    ``bind_tools`` returns the model itself (the script already knows which tools it
    calls); tool calls without an ``id`` get ``call_<turn>_<n>``. Running past the end of
    the script raises ``IndexError``.

    Args:
        steps: the script; each step an :class:`AIMessage`, a ``str`` (a final answer), a
            list of tool calls ``{"name": ..., "args": {...}}`` (an AI message calling
            them), or a callable taking the conversation and returning one of those.
    """

    steps: list[Any]

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool], **kwargs: Any) -> ScriptedChatModel:  # type: ignore[override]
        """Return this model unchanged: the script decides which tools are called."""
        return self

    def _next(self, messages: list[BaseMessage]) -> AIMessage:
        turn = 0
        for message in reversed(messages):
            if isinstance(message, HumanMessage):
                break
            turn += isinstance(message, AIMessage)
        if turn >= len(self.steps):
            raise IndexError(f"the script has {len(self.steps)} steps; the agent asked for step {turn + 1}")
        step = self.steps[turn]
        if callable(step):
            step = step(list(messages))
        if isinstance(step, str):
            return AIMessage(content=step)
        if isinstance(step, list):
            step = AIMessage(content="", tool_calls=[{"id": None, **call} for call in step])
        if not isinstance(step, AIMessage):
            raise TypeError(f"script step {turn + 1} gave {type(step).__name__}, not a message, str or tool calls")
        calls = [
            {**call, "id": call.get("id") or f"call_{turn}_{n}"} for n, call in enumerate(step.tool_calls)
        ]
        return step.model_copy(update={"tool_calls": calls})

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self._next(messages))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self._next(messages))])
