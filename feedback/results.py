"""The executor's view of the results stream: a bounded buffer of Results and its feeders.

The pipeline publishes one Result per processed frame (:mod:`stream.publish`; data frames and,
with ``kind``, dark and flat frames). The feedback side needs two things from that stream:

- the procedures' :class:`~feedback.commands.Acquire`: *new* Results of a kind, usable under
  the stale-frame rule (:class:`feedback.safety.FreshFilter`: acquired strictly after the
  procedure's last move finished, at rest, at the commanded positions, with side-thread
  metrics of a fresh frame), each handed out once;
- a stale-stream check (:func:`feedback.safety.stream_is_stale`): no Result for a while means
  the detector, the pipeline or the link stopped, and a procedure waiting for frames must end
  instead of waiting forever.

:class:`ResultBuffer` holds the newest Results in arrival order (bounded: the oldest go first)
and answers :meth:`ResultBuffer.acquire`. It is fed either in-process, from the pipeline's
publisher thread (``Publisher.add_listener(buffer.push)``: :meth:`ResultBuffer.push` returns
at once), or from another process by :class:`ResultsSubscriber` (a SUB socket on the
pipeline's results PUB, ``[endpoints] results``, on its own thread).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from feedback.commands import FRAME_KINDS, Result
from feedback.safety import FreshFilter, stream_is_stale
from stream.metrics import EXPENSIVE_KEYS
from stream.publish import MessageError, decode_message

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 4096
"""Results kept (about 3 min at 20 fps; a procedure only ever looks at the newest ones)."""


def result_kind(result: Result) -> str:
    """The frame kind of a Result (``data`` when the pipeline did not say)."""
    kind = result.get("kind")
    return kind if isinstance(kind, str) else "data"


class ResultBuffer:
    """The newest Results in arrival order, for the executor's acquisitions.

    Parameters
    ----------
    capacity : int
        Most Results kept; beyond it the oldest is dropped (counted in :attr:`dropped`).
    clock_ns : callable
        Wall clock, ns since the epoch (the clock of a frame's ``t_ns`` and of
        :class:`~feedback.commands.MoveDone`).

    Notes
    -----
    One consumer: each Result is examined by :meth:`acquire` at most once (a cursor moves past
    everything examined), so a Result is never handed out twice and a frame refused as stale
    is not looked at again. :meth:`push` may be called from any thread.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self._items: collections.deque[tuple[int, Result]] = collections.deque(maxlen=capacity)
        self._cond = threading.Condition()
        self._next_index = 0
        self._cursor = 0
        self._clock_ns = clock_ns
        self.last_arrival_ns: int | None = None
        self.received = 0
        self.dropped = 0
        self._used_metrics: collections.deque[int] = collections.deque(maxlen=capacity)

    def push(self, result: Result) -> None:
        """Add a Result (any thread; O(1), never blocks on a consumer)."""
        now = self._clock_ns()
        with self._cond:
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
            self._items.append((self._next_index, result))
            self._next_index += 1
            self.received += 1
            self.last_arrival_ns = now
            self._cond.notify_all()

    def latest(self) -> Result | None:
        """The newest Result, or None before the first."""
        with self._cond:
            return self._items[-1][1] if self._items else None

    def skip_to_end(self) -> None:
        """Forget everything received so far (the next acquisition only sees newer Results)."""
        with self._cond:
            self._cursor = self._next_index

    def wait_first(self, timeout_s: float) -> bool:
        """Wait until at least one Result arrived; whether one did within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.received == 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def _examine(self, result: Result, kind: str, fresh: FreshFilter, not_before_ns: int | None,
                 expensive: bool) -> str | None:
        """Why ``result`` cannot be used, or None if it can (marks its metrics used)."""
        if result_kind(result) != kind:
            return f"frame {result.get('seq')} is a {result_kind(result)} frame, not {kind}"
        t_ns = result.get("t_ns")
        if not_before_ns is not None and isinstance(t_ns, int) and t_ns <= not_before_ns:
            return f"frame {result.get('seq')} was acquired before the request"
        metrics_seq = result.get("metrics_seq")
        if expensive and metrics_seq in self._used_metrics:
            return f"side-thread metrics of frame {metrics_seq} were already used"
        if not fresh.accept(result):
            return fresh.reason
        if expensive and isinstance(metrics_seq, int):
            self._used_metrics.append(metrics_seq)
        return None

    def acquire(self, n_frames: int, *, kind: str = "data", fresh: FreshFilter | None = None,
                keys: Iterable[str] = (), not_before_ns: int | None = None,
                timeout_s: float = 10.0, stale_after_s: float = 2.0,
                abort: threading.Event | None = None) -> list[Result]:
        """Wait for ``n_frames`` usable Results not examined before.

        Parameters
        ----------
        n_frames : int
            How many (≥ 1).
        kind : str
            Frame kind (``data`` or ``flat``).
        fresh : FreshFilter, optional
            The stale-frame rule against the procedure's moves (None: at rest and any time).
        keys : iterable of str
            Metric keys the caller reads: with a side-thread key (``EXPENSIVE_KEYS``) a frame
            whose side-thread metrics were handed out before is not used again.
        not_before_ns : int, optional
            Only frames acquired (``t_ns``) strictly after this wall-clock time.
        timeout_s : float
            Longest wait for all of them, s.
        stale_after_s : float
            A stream with no Result for this long (counted from the request at the latest) is
            stale.
        abort : threading.Event, optional
            Set by another thread to stop waiting.

        Returns
        -------
        list of Result
            In arrival order.

        Raises
        ------
        TimeoutError
            The stream went stale, or fewer usable Results arrived within ``timeout_s``; the
            message says how many and why the last one was refused.
        InterruptedError
            ``abort`` was set.
        """
        if isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 1:
            raise ValueError(f"n_frames must be an integer >= 1, got {n_frames!r}")
        if kind not in FRAME_KINDS:
            raise ValueError(f"kind must be one of {FRAME_KINDS}, got {kind!r}")
        if not (timeout_s > 0 and stale_after_s > 0):
            raise ValueError(f"timeout_s and stale_after_s must be > 0, got {timeout_s!r}, "
                             f"{stale_after_s!r}")
        keys = tuple(keys)
        fresh = fresh if fresh is not None else FreshFilter((), {}, keys)
        expensive = any(key in EXPENSIVE_KEYS for key in keys)
        start_ns = self._clock_ns()
        deadline = time.monotonic() + timeout_s
        taken: list[Result] = []
        reason: str | None = None
        with self._cond:
            while True:
                for index, result in self._items:
                    if index < self._cursor:
                        continue
                    self._cursor = index + 1
                    problem = self._examine(result, kind, fresh, not_before_ns, expensive)
                    if problem is None:
                        taken.append(result)
                        if len(taken) == n_frames:
                            return taken
                    else:
                        reason = problem
                if abort is not None and abort.is_set():
                    raise InterruptedError("acquisition interrupted")
                now_ns = self._clock_ns()
                last = max(self.last_arrival_ns or start_ns, start_ns)
                if stream_is_stale(last, now_ns, stale_after_s):
                    raise TimeoutError(
                        f"stale results stream: no result for {(now_ns - last) / 1e9:.3g} s "
                        f"(got {len(taken)} of {n_frames} usable {kind} frame(s))")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    why = f"; last refused: {reason}" if reason else ""
                    raise TimeoutError(f"only {len(taken)} of {n_frames} usable {kind} "
                                       f"frame(s) within {timeout_s:g} s{why}")
                self._cond.wait(min(remaining, 0.05))


class ResultsSubscriber:
    """Feeds a :class:`ResultBuffer` from the pipeline's results PUB socket (own thread).

    Parameters
    ----------
    url : str
        The results endpoint (``[endpoints] results``); the SUB socket connects to it.
    buffer : ResultBuffer
    context : zmq.Context, optional

    Attributes
    ----------
    counters : dict
        ``received`` (decoded Results) and ``rejected`` (messages that are not Results).
    """

    def __init__(self, url: str, buffer: ResultBuffer, *,
                 context: zmq.Context | None = None) -> None:
        if not isinstance(url, str) or "://" not in url:
            raise ValueError(f"results URL must be a ZMQ endpoint like tcp://127.0.0.1:5556, "
                             f"got {url!r}")
        self.url = url
        self.buffer = buffer
        self.counters = {"received": 0, "rejected": 0}
        ctx = context or zmq.Context.instance()
        self._sock = ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 10000)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="results-sub", daemon=True)

    def start(self) -> None:
        """Connect and start receiving."""
        try:
            self._sock.connect(self.url)
        except zmq.ZMQError as exc:
            raise ValueError(f"cannot connect to the results stream {self.url!r}: {exc}") \
                from None
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            data = self._sock.recv(copy=False)
            try:
                result = decode_message(data.buffer, "result")
            except MessageError as exc:
                self.counters["rejected"] += 1
                if self.counters["rejected"] == 1:
                    log.warning("results stream %s: skipping a message that is not a Result "
                                "(%s)", self.url, exc)
                continue
            self.counters["received"] += 1
            self.buffer.push(result)

    def close(self) -> None:
        """Stop receiving and close the socket (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        self._sock.close()

    def __enter__(self) -> ResultsSubscriber:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def result_summary(result: Result, keys: Iterable[str] = ()) -> dict[str, Any]:
    """A small JSON-able description of a Result for the action log: seq, t_ns, chosen metrics."""
    metrics = result.get("metrics") or {}
    return {"seq": result.get("seq"), "t_ns": result.get("t_ns"),
            **{key: metrics.get(key) for key in keys}}
