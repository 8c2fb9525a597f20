"""Which ``aiohttp.ClientSession`` a request uses: the session scope of the transport.

- One pooled session per client, opened lazily on the first request's event loop.
- A call from another live event loop, or inside :func:`run_sync`, gets a private session.
- When the pool's loop has been closed, its sockets are closed without it
  (:func:`abandon_session`) and a new pool is opened.
- An application's own session (``http_session=``) is borrowed and never closed;
  ``trust_env=True`` honours ``HTTP(S)_PROXY`` / ``NO_PROXY``.

Example::

    scope = SessionScope(trust_env=True)
    async with scope.session() as session:
        async with session.get("http://localhost:2020/v1/models") as resp:
            print(resp.status)
    await scope.aclose()
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import aiohttp

__all__ = ["SessionScope", "abandon_session", "iterate_sync", "run_sync"]

_T = TypeVar("_T")
#: Set by :func:`run_sync`: calls in this context use a session of their own.
_PRIVATE_SESSION: ContextVar[bool] = ContextVar("moondream_private_session", default=False)


def abandon_session(session: aiohttp.ClientSession) -> None:
    """Drop a session whose event loop is gone, closing its sockets without that loop.

    A session's connections belong to the loop that opened them; once that loop is closed
    they cannot be closed the normal way, and aiohttp has no public API for it. This reaches
    into ``BaseConnector._conns``, ``BaseConnector._acquired``, ``BaseConnector._close`` and
    the asyncio transport's ``_sock``: the supported aiohttp range is pinned in
    ``pyproject.toml`` and ``tests/core/test_transport.py`` fails loudly if they change.
    """
    connector = session.connector
    session.detach()
    if connector is None:
        return
    protocols: list[Any] = []
    for entries in getattr(connector, "_conns", {}).values():
        protocols.extend(proto for proto, _ in entries)
    protocols.extend(getattr(connector, "_acquired", ()))
    for proto in protocols:
        transport = getattr(proto, "transport", None)
        sock = getattr(transport, "_sock", None)
        if sock is not None:
            try:
                sock.close()
            finally:
                transport._sock = None  # type: ignore[union-attr]
    try:
        connector._close()
    except RuntimeError:  # pragma: no cover - loop already gone
        pass


class SessionScope:
    """Which ``aiohttp.ClientSession`` a request uses, and closing it.

    - One pooled session, opened lazily on the first request's event loop and reused.
    - A call from another live event loop (a framework's sync wrapper in a worker thread),
      or inside :func:`run_sync`, gets a private session closed at the end of the call.
    - When the pool's loop has been closed, its sockets are closed and a new pool opened.
    - ``http_session``: the application's own session, used for calls on its loop and
      never closed here. ``trust_env``: honour ``HTTP(S)_PROXY`` / ``NO_PROXY`` (and
      ``.netrc``) in every session this scope opens.
    """

    def __init__(self, *, trust_env: bool = False, http_session: aiohttp.ClientSession | None = None) -> None:
        if http_session is not None and not isinstance(http_session, aiohttp.ClientSession):
            raise TypeError(f"http_session must be an aiohttp.ClientSession, got {type(http_session).__name__}")
        self.trust_env = trust_env or (http_session is not None and http_session.trust_env)
        self._borrowed = http_session
        # The loop the application's session belongs to (aiohttp keeps it as ClientSession._loop;
        # tests/core/test_transport.py checks that): calls from any other loop use a private session.
        self._borrowed_loop: asyncio.AbstractEventLoop | None = getattr(http_session, "_loop", None)
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    @property
    def pooled(self) -> aiohttp.ClientSession | None:
        """The session requests on the owning loop use now (None before the first request)."""
        return self._borrowed if self._borrowed is not None else self._session

    def _new_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300), trust_env=self.trust_env
        )

    @asynccontextmanager
    async def session(self) -> AsyncIterator[aiohttp.ClientSession]:
        """The session for a request made now, on the running loop."""
        if self.closed:
            raise RuntimeError("this client is closed; create a new one")
        if not _PRIVATE_SESSION.get():
            loop = asyncio.get_running_loop()
            shared = self._shared(loop)
            if shared is not None:
                yield shared
                return
        # A sync wrapper's loop that dies with the call, or a pool owned by another live loop.
        private = self._new_session()
        try:
            yield private
        finally:
            await private.close()

    def _shared(self, loop: asyncio.AbstractEventLoop) -> aiohttp.ClientSession | None:
        if self._borrowed is not None:
            if self._borrowed.closed:
                raise RuntimeError("the http_session given to this client is closed")
            if self._borrowed_loop is None:  # pragma: no cover - aiohttp always records it
                self._borrowed_loop = loop
            return self._borrowed if self._borrowed_loop is loop else None
        owner = self._session_loop
        if self._session is not None and owner is loop and not self._session.closed:
            return self._session
        if self._session is None or owner is None or owner.is_closed() or self._session.closed:
            if self._session is not None:
                abandon_session(self._session)
            self._session = self._new_session()
            self._session_loop = loop
            return self._session
        return None  # the pool belongs to another loop that is still alive

    async def aclose(self) -> None:
        """Close the pooled session (never a borrowed one). The scope cannot be used after."""
        self.closed = True
        session, loop = self._session, self._session_loop
        self._session = self._session_loop = None
        if session is None or session.closed:
            return
        running = asyncio.get_running_loop()
        if loop is running:
            await session.close()
        elif loop is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(session.close(), loop)
            await asyncio.wrap_future(future)
        else:
            abandon_session(session)


def run_sync(call: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run an async client call from synchronous code and return its result.

    With no event loop running in this thread, the call runs here on a fresh loop;
    inside a running loop (a notebook, an async framework calling a sync tool), it runs
    on a fresh loop in a worker thread, so the running loop is never blocked re-entrantly.
    Either way the call uses an HTTP session of its own, closed before this returns, so a
    client shared with async code is never tied to a loop that is about to end.

    Example::

        md = AsyncMoondream()
        caption = run_sync(lambda: md.caption("photo.jpg"))
    """

    def run() -> _T:
        token = _PRIVATE_SESSION.set(True)
        try:
            return asyncio.run(call())
        finally:
            _PRIVATE_SESSION.reset(token)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moondream-sync") as pool:
        return pool.submit(run).result()


def iterate_sync(make: Callable[[], AsyncIterator[_T]]) -> Iterator[_T]:
    """Iterate an async iterator from synchronous code, item by item.

    The iterator ``make()`` returns runs on a fresh event loop in a worker thread (so this
    works in plain scripts and inside a running loop alike), with HTTP sessions of its own as
    in :func:`run_sync`; at most one item waits to be taken. Closing the returned generator
    early (``break``) closes the async iterator on its loop and ends the thread.

    Example::

        for record in iterate_sync(lambda: indexer.stream(["photos/"])):
            print(record.source)
    """
    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()
    loop_box: list[asyncio.AbstractEventLoop] = []
    task_box: list[asyncio.Task[None]] = []

    def hand_over(entry: tuple[str, Any]) -> bool:
        """Put ``entry`` for the consumer (blocking, in a thread); False once it has stopped."""
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    async def pump() -> None:
        iterator = make()
        try:
            async for item in iterator:
                if not await asyncio.to_thread(hand_over, ("item", item)):
                    break
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()

    def run() -> None:
        token = _PRIVATE_SESSION.set(True)
        outcome: tuple[str, Any] = ("done", None)
        try:
            loop = asyncio.new_event_loop()
            loop_box.append(loop)
            try:
                task = loop.create_task(pump())
                task_box.append(task)
                loop.run_until_complete(task)
            except asyncio.CancelledError:
                pass
            except BaseException as exc:  # handed to the consumer
                outcome = ("error", exc)
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()
        finally:
            _PRIVATE_SESSION.reset(token)
            hand_over(outcome)

    worker = threading.Thread(target=run, name="moondream-iterate", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()
        if loop_box and task_box:
            with contextlib.suppress(RuntimeError):  # the loop has already finished
                loop_box[0].call_soon_threadsafe(task_box[0].cancel)
        worker.join()
