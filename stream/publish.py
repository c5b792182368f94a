"""Results and previews: their messages and the thread that publishes them.

Results go out on a PUB socket, one single-part msgpack message per processed frame; previews
(binned image + newest metrics and status) on another PUB socket with SNDHWM 1, so a slow
viewer only ever gets the newest one and costs the pipeline nothing. Both carry the frame's
``seq``. The processing thread never touches a socket: it hands results to a queue and
previews to a keep-latest slot, and :class:`Publisher` (its own thread) sends them.

Result message keys: ``v``, ``type`` ("result"), ``seq`` (= ``seq_last``), ``seq_first``,
``seq_last``, ``n_frames``, ``series``, ``t_ns``, ``energy_ev``, ``exposure_s``, ``positions``,
``moving``, ``pixel_nm``, ``corrected``, ``reference_id``, ``flags``, ``metrics``,
``metrics_seq``, ``counters``, ``stamps`` (monotonic ns per stage, ``publish`` included),
``latency_ms`` (``t_ns`` → publish, wall clock).

Preview message keys: ``v``, ``type`` ("preview"), ``seq``, ``t_ns``, ``shape``, ``dtype``,
``bin``, ``pixel_nm`` (of the binned image), ``image`` (raw bytes), ``metrics``, ``counters``,
``status``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import zmq

from stream.queues import BoundedQueue, Closed, LatestSlot

log = logging.getLogger(__name__)

MESSAGE_VERSION = 1


class MessageError(ValueError):
    """A results/preview message that cannot be decoded."""


def encode_message(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def decode_message(data: bytes | memoryview, expect: str) -> dict[str, Any]:
    """Decode a results (``expect="result"``) or preview message, checking its type."""
    try:
        message = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise MessageError(f"not a msgpack message ({exc})") from exc
    if not isinstance(message, dict) or message.get("type") != expect:
        raise MessageError(f"expected a {expect!r} message")
    if message.get("v") != MESSAGE_VERSION:
        raise MessageError(f"unknown message version {message.get('v')!r}")
    return message


def preview_image(message: dict[str, Any]) -> np.ndarray:
    """The binned image of a decoded preview message (read-only view, no copy)."""
    return np.frombuffer(message["image"], dtype=message["dtype"]).reshape(message["shape"])


class Publisher:
    """Owns the results and preview PUB sockets and sends from its own thread.

    Parameters
    ----------
    results_url, preview_url : str or None
        Endpoints to bind; None disables that stream.
    queue_results : int
        Results waiting to be sent; beyond it the oldest is dropped and counted (PUB
        semantics: a publisher never waits for subscribers).
    """

    def __init__(self, results_url: str | None, preview_url: str | None, *,
                 queue_results: int = 1024, context: zmq.Context | None = None):
        ctx = context or zmq.Context.instance()
        self._results_sock = self._preview_sock = None
        if results_url:
            self._results_sock = ctx.socket(zmq.PUB)
            self._results_sock.setsockopt(zmq.SNDHWM, 10000)
            self._results_sock.setsockopt(zmq.LINGER, 500)
            self._results_sock.bind(results_url)
        if preview_url:
            self._preview_sock = ctx.socket(zmq.PUB)
            self._preview_sock.setsockopt(zmq.SNDHWM, 1)
            self._preview_sock.setsockopt(zmq.LINGER, 0)
            self._preview_sock.bind(preview_url)
        self.results: BoundedQueue[dict[str, Any]] = BoundedQueue(queue_results, "drop-oldest")
        self.previews: LatestSlot[tuple[dict[str, Any], np.ndarray, Any]] = LatestSlot()
        self.counters = {"results_sent": 0, "previews_sent": 0, "listener_errors": 0}
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.latencies_ms: list[float] = []
        self._thread = threading.Thread(target=self._run, name="txmlive-publish", daemon=True)

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(result)`` with every sent result, from the publisher thread.

        Listeners must return at once (hand the value to a keep-latest slot or queue): the
        PV server and the feedback loops take results this way.
        """
        self.listeners.append(listener)

    def start(self) -> None:
        self._thread.start()

    def submit_preview(self, message: dict[str, Any], image: np.ndarray,
                       release: Any = None) -> None:
        """Offer a preview; ``release(image)`` is called once the image was packed."""
        self.previews.put((message, image, release))

    def _send_result(self, result: dict[str, Any]) -> None:
        now_ns = time.time_ns()
        result["stamps"]["publish"] = time.monotonic_ns()
        result["latency_ms"] = (now_ns - result["t_ns"]) / 1e6
        self.latencies_ms.append(result["latency_ms"])
        if self._results_sock is not None:
            self._results_sock.send(encode_message(result), copy=False)
        self.counters["results_sent"] += 1
        for listener in self.listeners:
            try:
                listener(result)
            except Exception:  # a consumer's bug must not stop publishing
                self.counters["listener_errors"] += 1
                log.exception("result listener %r failed", listener)

    def _send_preview(self) -> None:
        item = self.previews.take(0)
        if item is None:
            return
        message, image, release = item
        message["image"] = image.tobytes()
        if release is not None:
            release(image)
        if self._preview_sock is not None:
            try:
                self._preview_sock.send(encode_message(message), zmq.NOBLOCK)
            except zmq.Again:
                return
        self.counters["previews_sent"] += 1

    def _run(self) -> None:
        while True:
            try:
                result = self.results.get(timeout=0.02)
            except Closed:
                break
            if result is not None:
                self._send_result(result)
            self._send_preview()
        self._send_preview()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then close the sockets."""
        self.results.close()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for sock in (self._results_sock, self._preview_sock):
            if sock is not None:
                sock.close()
