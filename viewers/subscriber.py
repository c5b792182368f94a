"""Keep-latest subscriber to the preview stream, polled from the GUI timer without blocking.

The SUB socket has ``CONFLATE`` (ZMQ keeps only the newest message; previews are single-part,
which conflation requires) and ``RCVHWM 1``. A viewer that is slow, paused or never polls
therefore holds at most one preview and the pipeline's PUB (``SNDHWM 1``, non-blocking send)
never waits for it.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from stream.publish import MessageError, decode_message

log = logging.getLogger(__name__)


class PreviewSubscriber:
    """SUB socket connected to a preview PUB; :meth:`poll` returns the newest preview or None.

    Parameters
    ----------
    connect : str
        Endpoint of the preview PUB, e.g. ``"tcp://127.0.0.1:5557"``.
    context : zmq.Context, optional
        Defaults to the process-wide instance.

    Attributes
    ----------
    received : int
        Previews decoded.
    rejected : int
        Messages that were not valid previews (skipped, logged).
    """

    def __init__(self, connect: str, *, context: zmq.Context | None = None):
        if not isinstance(connect, str) or "://" not in connect:
            raise ValueError(f"connect must be a ZMQ endpoint like 'tcp://host:port', "
                             f"got {connect!r}")
        ctx = context or zmq.Context.instance()
        self._sock = ctx.socket(zmq.SUB)
        # Options before connect: CONFLATE only applies to pipes created after it is set.
        self._sock.setsockopt(zmq.CONFLATE, 1)
        self._sock.setsockopt(zmq.RCVHWM, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(connect)
        self.connect = connect
        self.received = 0
        self.rejected = 0

    def poll(self) -> dict[str, Any] | None:
        """The newest preview that arrived since the last call, or None; never blocks."""
        newest = None
        while True:
            try:
                data = self._sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            newest = data
        if newest is None:
            return None
        try:
            message = decode_message(newest.buffer, "preview")
        except MessageError as exc:
            self.rejected += 1
            log.warning("skipped a message on %s: %s", self.connect, exc)
            return None
        self.received += 1
        return message

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> PreviewSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
