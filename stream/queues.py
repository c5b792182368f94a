"""Hand-offs between pipeline threads, each with an explicit policy.

- :class:`BoundedQueue` with policy ``block`` (lossless backpressure) or ``drop-oldest``
  (freshness first; every drop is counted).
- :class:`LatestSlot`: keep-latest, for consumers that only want the newest value (preview,
  feedback, expensive metrics). A put never waits.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Generic, TypeVar

T = TypeVar("T")

POLICIES = ("block", "drop-oldest")


class Closed(Exception):
    """Raised by ``get`` once a closed queue is empty."""


class BoundedQueue(Generic[T]):
    """A FIFO of at most ``maxsize`` items.

    Parameters
    ----------
    maxsize : int
        Capacity, items.
    policy : {"block", "drop-oldest"}
        What ``put`` does when full: wait for room, or discard the oldest item.
    """

    def __init__(self, maxsize: int, policy: str = "block"):
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r} is not one of {POLICIES}")
        self.maxsize = maxsize
        self.policy = policy
        self.dropped = 0
        self.max_depth = 0
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: T, stop: threading.Event | None = None) -> None:
        """Add ``item``; with ``block`` wait for room (until ``stop`` is set, then drop it)."""
        with self._cond:
            while len(self._items) >= self.maxsize:
                if self.policy == "drop-oldest":
                    self._items.popleft()
                    self.dropped += 1
                    break
                if stop is not None and stop.is_set():
                    self.dropped += 1
                    return
                self._cond.wait(0.05)
            self._items.append(item)
            self.max_depth = max(self.max_depth, len(self._items))
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> T | None:
        """The oldest item, or None after ``timeout`` s; raises :class:`Closed` when drained."""
        with self._cond:
            if not self._items:
                if self._closed:
                    raise Closed
                self._cond.wait(timeout)
                if not self._items:
                    if self._closed:
                        raise Closed
                    return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """No more puts; ``get`` drains what is left, then raises :class:`Closed`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._items)


class LatestSlot(Generic[T]):
    """Holds only the newest value; ``put`` replaces (and counts) an unread one."""

    def __init__(self) -> None:
        self._value: Any = None
        self._has = False
        self._cond = threading.Condition()
        self.replaced = 0

    def put(self, value: T) -> None:
        with self._cond:
            if self._has:
                self.replaced += 1
            self._value, self._has = value, True
            self._cond.notify_all()

    def take(self, timeout: float | None = None) -> T | None:
        """The newest unread value (and mark it read), or None after ``timeout`` s."""
        with self._cond:
            if not self._has:
                self._cond.wait(timeout)
            if not self._has:
                return None
            self._has = False
            value, self._value = self._value, None
            return value
