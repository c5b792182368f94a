"""Frame sources: where the pipeline's frames come from.

A source is anything with ``recv(timeout_s) -> Frame | None``, a ``counters`` mapping and
``close()``. Malformed messages never stop a source: they are counted by
:attr:`WireError.reason <stream.wire.WireError>` in ``counters["rejected"]`` and skipped.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import zmq

from stream.frame import Frame, end_frame
from stream.wire import DEFAULT_MAX_PAYLOAD_BYTES, WireError, decode_message

log = logging.getLogger(__name__)


class Source(Protocol):
    """What the pipeline needs from a frame source."""

    counters: dict[str, Any]

    def recv(self, timeout_s: float) -> Frame | None: ...

    def close(self) -> None: ...


def _new_counters() -> dict[str, Any]:
    return {"received": 0, "rejected": {}, "last_error": None}


def _decode_counted(counters: dict[str, Any], parts: Sequence[Any],
                    max_payload_bytes: int) -> Frame | None:
    """Decode one message; a bad one is counted by reason and gives None."""
    try:
        frame = decode_message(parts, max_payload_bytes)
    except WireError as exc:
        _reject(counters, exc)
        return None
    counters["received"] += 1
    return frame


def _reject(counters: dict[str, Any], exc: WireError) -> None:
    rejected = counters["rejected"]
    rejected[exc.reason] = rejected.get(exc.reason, 0) + 1
    counters["last_error"] = str(exc)
    # One line per reason and power-of-two count keeps a flood of garbage readable.
    n = rejected[exc.reason]
    if n & (n - 1) == 0:
        log.warning("rejected message (%s, %d so far): %s", exc.reason, n, exc)


class ZmqSource:
    """Frames from a ZMQ socket (wire protocol v1 or ADZMQ), zero-copy.

    Parameters
    ----------
    url : str
        Endpoint, e.g. ``tcp://127.0.0.1:5555``.
    socket_type : {"pull", "sub"}
        PULL (default, lossless fan-in from a PUSH sender) or SUB (tap a PUB stream).
    bind : bool
        Bind instead of connect.
    rcvhwm : int
        Receive high-water mark, messages.
    max_payload_bytes : int
        Larger payloads are rejected as ``payload_size``.
    """

    def __init__(self, url: str, *, socket_type: str = "pull", bind: bool = False,
                 rcvhwm: int = 64, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 context: zmq.Context | None = None):
        kinds = {"pull": zmq.PULL, "sub": zmq.SUB}
        if socket_type not in kinds:
            raise ValueError(f"socket_type {socket_type!r} is not one of {sorted(kinds)}")
        self.url = url
        self.max_payload_bytes = max_payload_bytes
        self.counters = _new_counters()
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(kinds[socket_type])
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Cap what libzmq will allocate for one message before we ever see it.
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_payload_bytes + 65536)
        if socket_type == "sub":
            self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        if bind:
            self._sock.bind(url)
        else:
            self._sock.connect(url)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)

    def recv(self, timeout_s: float) -> Frame | None:
        """The next valid frame, or None if none arrived within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._poller.poll(remaining_ms):
                return None
            parts = self._sock.recv_multipart(copy=False)
            frame = _decode_counted(self.counters, parts, self.max_payload_bytes)
            if frame is not None:
                return frame

    def close(self) -> None:
        self._sock.close(linger=0)


class MemorySource:
    """Frames (or raw message parts, to test bad input) from memory, for tests and replays.

    Items that are :class:`Frame` pass through; sequences of parts are decoded like messages
    from the wire, so malformed ones are counted exactly as :class:`ZmqSource` counts them.
    With ``end=True`` an ``end`` frame follows the last item, as a replay sends one.
    """

    def __init__(self, items: Iterable[Frame | Sequence[Any]],
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES, end: bool = True):
        self._items = itertools.chain(items, [end_frame(-1)] if end else [])
        self.max_payload_bytes = max_payload_bytes
        self.counters = _new_counters()

    def recv(self, timeout_s: float) -> Frame | None:
        for item in self._items:
            if isinstance(item, Frame):
                self.counters["received"] += 1
                return item
            frame = _decode_counted(self.counters, item, self.max_payload_bytes)
            if frame is not None:
                return frame
        time.sleep(min(timeout_s, 0.01))
        return None

    def close(self) -> None:
        pass
