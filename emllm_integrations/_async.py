"""Streams of the engine's blocking generators, consumed from asyncio (shared by both adapters).

A session's lock is re-entrant and owned by the thread that took it, so a stream must be iterated from
start to end on one thread (LangChain's default `_astream` would advance it from a different executor
thread each step); `iterate_in_thread` does that and hands items to the event loop. Knows nothing about
LangChain, LlamaIndex or the engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


async def iterate_in_thread(make_iterator: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Iterate `make_iterator()` on a dedicated thread; yield its items here. Leaving early stops it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue()
    stop = threading.Event()

    def put(item: object, error: BaseException | None = None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
        except RuntimeError:  # the loop closed after its consumer left
            stop.set()

    def run() -> None:
        try:
            iterator = make_iterator()
            try:
                for item in iterator:
                    put(item)
                    if stop.is_set():
                        break
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()  # on this thread, so the session lock is released where it was taken
        except BaseException as error:  # handed to the awaiting side
            put(_DONE, error)
        else:
            put(_DONE)

    worker = threading.Thread(target=run, name="emllm-stream", daemon=True)
    worker.start()
    try:
        while True:
            item, error = await queue.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()


__all__ = ["iterate_in_thread"]
