"""SessionLock: one caller at a time per session, where a caller is a thread or an open stream.

A plain method holds the lock for one call on one thread (re-entrant there, like an RLock). A stream holds
it for its whole life, across its yields: whichever thread resumes it, or closes it (an early `close()`,
or the garbage collector, in any thread), it releases the same hold. A thread-bound RLock held across
yields cannot be released from another thread and would leave the session locked for good.
Knows nothing about sessions.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StreamHold:
    """The lock held by one stream; `thread` is the thread that last ran the stream's code."""

    __slots__ = ("thread",)

    def __init__(self) -> None:
        self.thread = threading.get_ident()

    def resumed(self) -> None:
        """Call right after each yield: the thread that resumed the stream may re-enter the lock."""
        self.thread = threading.get_ident()


class SessionLock:
    """Mutual exclusion between threads and streams; see the module docstring."""

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._holder: int | StreamHold | None = None  # a thread id, or a stream's hold
        self._depth = 0

    def _holds(self, me: int) -> bool:
        holder = self._holder
        return holder == me or (isinstance(holder, StreamHold) and holder.thread == me)

    def acquire(self) -> None:
        """Wait until no other thread or stream holds the lock, then hold it (again) for this thread."""
        me = threading.get_ident()
        with self._condition:
            while self._holder is not None and not self._holds(me):
                self._condition.wait()
            if self._holder is None:
                self._holder = me
            self._depth += 1

    def release(self) -> None:
        with self._condition:
            if self._depth == 0:
                raise RuntimeError("release of an unheld SessionLock")
            self._depth -= 1
            if self._depth == 0:
                self._holder = None
                self._condition.notify_all()

    def __enter__(self) -> SessionLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    @contextmanager
    def stream(self) -> Iterator[StreamHold]:
        """Hold the lock for a stream (a generator): released on exit, from whichever thread exits."""
        hold = StreamHold()
        me = hold.thread
        with self._condition:
            while self._holder is not None and not self._holds(me):
                self._condition.wait()
            outer = self._holder  # this thread (or a stream it runs) already holds it: nest inside that
            if outer is None:
                self._holder = hold
            self._depth += 1
        try:
            yield hold
        finally:
            self.release()


__all__ = ["SessionLock", "StreamHold"]
