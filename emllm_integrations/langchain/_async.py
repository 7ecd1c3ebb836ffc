"""Async iteration over a blocking iterator, run whole in one worker thread.

Generation holds the session's lock from first token to last; LangChain's default `_astream` would
advance the iterator from a different executor thread each step, and a lock cannot be released by a
thread that did not take it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


async def iterate_in_thread(make_iterator: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Yield the items of `make_iterator()` as one worker thread produces them; stop it if abandoned."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    abandoned = threading.Event()

    def put(item: object, error: BaseException | None = None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (item, error))

    def work() -> None:
        try:
            iterator = make_iterator()
            try:
                for item in iterator:
                    put(item)
                    if abandoned.is_set():
                        break
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
            put(_DONE)
        except BaseException as exc:  # handed to the awaiting side, which re-raises it
            put(_DONE, exc)

    worker = loop.run_in_executor(None, work)
    try:
        while True:
            item, error = await queue.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        abandoned.set()
        await worker


__all__ = ["iterate_in_thread"]
