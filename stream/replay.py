"""Replay recorded frames as a live detector: a ZMQ PUSH socket speaking wire protocol v1.

:func:`replay` binds PUSH on an endpoint (``DESIGN.md``'s default frames endpoint is
``tcp://127.0.0.1:5555``), waits for a receiver and sends each frame with
:func:`stream.wire.encode`, zero-copy. Pacing follows an absolute schedule (frame ``k`` is due
``k / fps`` after the first, or at the recorded ``t_ns`` offsets in real time), so sleep jitter
never accumulates into drift; a sender that falls behind catches up, and the summary reports how
late the latest frame went out (``max_lag_s``). A paced replay stamps each frame's ``t_ns`` with
its send time, keeping the recorded time in ``attrs["recorded_t_ns"]``, so latency downstream
is measured from the send.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import zmq

from stream.frame import Frame, end_frame
from stream.wire import encode

DEFAULT_SNDHWM = 16
"""Send high-water mark, frames: a few full 2048x2048 16-bit frames (8 MiB each) in flight."""

DEFAULT_LINGER_S = 5.0
"""How long closing the socket waits for queued frames (and the end frame) to go out, s."""

_POLL_MS = 50  # how often a blocked send looks at the stop event


def replay(frames: Iterable[Frame], bind: str, *, fps: float | None = None,
           realtime: bool = False, loop: bool = False, send_end: bool = True,
           stop: threading.Event | None = None, hwm: int = DEFAULT_SNDHWM,
           stamp: bool | None = None, linger_s: float = DEFAULT_LINGER_S) -> dict[str, Any]:
    """Send ``frames`` on a PUSH socket bound to ``bind``, as a detector would.

    Parameters
    ----------
    frames : iterable of Frame
        Frames in send order, e.g. a :class:`stream.readers.Series`. With ``loop`` it must be
        re-iterable (a Series or a list, not a one-shot iterator).
    bind : str
        ZMQ endpoint to bind, e.g. ``"tcp://127.0.0.1:5555"``.
    fps : float, optional
        Send at this rate, frames per second, on an absolute schedule.
    realtime : bool
        Send at the recorded spacing of ``t_ns`` between consecutive frames of the same kind
        (no wait where the kind changes or time goes backwards). Excludes ``fps``.
    loop : bool
        After the last frame, send the data frames again (darks and flats go only once), with
        ``seq`` continuing to increase, until ``stop`` is set.
    send_end : bool
        Send an ``end`` frame after the last frame (also when stopped early).
    stop : threading.Event, optional
        Set it to end the replay early; waits and blocked sends notice within ~50 ms.
    hwm : int
        Send high-water mark, frames (>= 1); a full queue blocks the sender, never drops.
    stamp : bool, optional
        Replace each frame's ``t_ns`` with its send time (``time.time_ns()``) and keep the
        recorded one in ``attrs["recorded_t_ns"]``. Default: when paced (``fps`` or
        ``realtime``); an unpaced replay re-sends the recorded times as they are.
    linger_s : float
        How long closing waits for queued frames to be delivered, s.

    Returns
    -------
    dict
        ``sent`` (frames per kind ``dark``/``flat``/``data``), ``frames`` (total, end frame not
        counted), ``end_sent``, ``passes`` (passes over the source started), ``duration_s``
        (first to last frame sent), ``fps`` (achieved: ``(frames - 1) / duration_s``),
        ``max_lag_s`` (largest delay of a send behind its schedule; 0 when unpaced),
        ``stopped`` and ``bind``.

    Raises
    ------
    ValueError
        Bad pacing arguments, ``loop`` over a one-shot iterator, or an ``end`` frame among
        ``frames``.
    OSError
        ``bind`` cannot be bound.
    """
    _check_args(frames, fps, realtime, loop, hwm, linger_s)
    stop = stop if stop is not None else threading.Event()
    paced = fps is not None or realtime
    stamp = paced if stamp is None else stamp
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    try:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.LINGER, round(linger_s * 1000))
        try:
            sock.bind(bind)
        except zmq.ZMQError as exc:
            raise OSError(f"cannot bind the replay PUSH socket to {bind!r}: {exc}") from exc
        summary = _run(sock, frames, fps=fps, realtime=realtime, loop=loop, stop=stop,
                       stamp=stamp)
        end = end_frame(summary.pop("next_seq"), summary.pop("series"))
        # the end frame goes out even after a stop, but never waits longer than linger_s
        summary["end_sent"] = send_end and _send(
            sock, lambda: encode(end), threading.Event(), time.monotonic() + linger_s)
        summary["stopped"] = stop.is_set()
        summary["bind"] = bind
        return summary
    finally:
        sock.close()
        ctx.term()  # returns once queued frames are delivered or linger_s has passed


def _check_args(frames: Iterable[Frame], fps: float | None, realtime: bool, loop: bool,
                hwm: int, linger_s: float) -> None:
    if fps is not None and realtime:
        raise ValueError("choose fps or realtime pacing, not both")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")
    if not isinstance(hwm, int) or hwm < 1:
        raise ValueError(f"hwm must be an int >= 1 (frames), got {hwm!r}")
    if not (math.isfinite(linger_s) and linger_s >= 0):
        raise ValueError(f"linger_s must be a finite number >= 0, got {linger_s!r}")
    if loop and iter(frames) is frames:
        raise ValueError("loop needs a re-iterable source (a Series or a list), not a one-shot "
                         "iterator")


def _passes(frames: Iterable[Frame], loop: bool) -> Iterator[tuple[int, Frame]]:
    """(pass number, frame): everything once, then (with ``loop``) the data frames forever."""
    pass_no = 0
    while True:
        any_data = False
        for frame in frames:
            if frame.kind == "end":
                raise ValueError(f"frame seq {frame.seq} is an 'end' frame; replay sends its own")
            if pass_no and frame.kind != "data":
                continue
            any_data = any_data or frame.kind == "data"
            yield pass_no, frame
        if not (loop and any_data):
            return
        pass_no += 1


class _RealtimeGaps:
    """Recorded spacing between consecutive sent frames, for realtime pacing."""

    def __init__(self) -> None:
        self.prev: Frame | None = None
        self.data_first_ns = 0
        self.data_last_ns = 0
        self.data_count = 0
        self.data_exposure_s = 0.0

    def gap_s(self, frame: Frame, pass_no: int, wrapped: bool) -> float:
        """Seconds to wait between the previous frame and ``frame``."""
        prev, self.prev = self.prev, frame
        if frame.kind == "data" and pass_no == 0:
            if not self.data_count:
                self.data_first_ns, self.data_exposure_s = frame.t_ns, frame.exposure_s
            self.data_last_ns = frame.t_ns
            self.data_count += 1
        if prev is None:
            return 0.0
        if wrapped:
            # back at the first data frame: wait one mean data spacing of the recording
            if self.data_count > 1:
                return (self.data_last_ns - self.data_first_ns) / 1e9 / (self.data_count - 1)
            return self.data_exposure_s
        if frame.kind != prev.kind or frame.t_ns < prev.t_ns:
            return 0.0
        return (frame.t_ns - prev.t_ns) / 1e9


def _run(sock: zmq.Socket, frames: Iterable[Frame], *, fps: float | None, realtime: bool,
         loop: bool, stop: threading.Event, stamp: bool) -> dict[str, Any]:
    counts = {"dark": 0, "flat": 0, "data": 0}
    gaps = _RealtimeGaps()
    paced = fps is not None or realtime
    anchor = last_sent = 0.0  # monotonic s of the first and the latest send
    due_s = max_lag_s = 0.0  # schedule offset of the current frame from the first, s
    sent = shift = next_seq = current_pass = 0
    series = None
    for pass_no, frame in _passes(frames, loop):
        if stop.is_set():
            break
        wrapped = pass_no != current_pass
        if wrapped:
            current_pass = pass_no
            shift = next_seq - frame.seq  # seq continues from the last one sent
        if realtime:
            due_s += gaps.gap_s(frame, pass_no, wrapped)
        elif fps is not None:
            due_s = sent / fps
        if sent and paced and stop.wait(max(0.0, anchor + due_s - time.monotonic())):
            break
        seq = frame.seq + shift
        if not _send(sock, lambda f=frame, s=seq: encode(_outgoing(f, s, stamp)), stop):
            break
        now = time.monotonic()
        if not sent:
            anchor = now
        elif paced:
            max_lag_s = max(max_lag_s, now - (anchor + due_s))
        last_sent = now
        sent += 1
        counts[frame.kind] += 1
        next_seq = seq + 1
        series = frame.series
    duration_s = last_sent - anchor
    return {
        "sent": counts, "frames": sent, "passes": current_pass + 1 if sent else 0,
        "duration_s": duration_s,
        "fps": (sent - 1) / duration_s if sent > 1 and duration_s > 0 else 0.0,
        "max_lag_s": max_lag_s, "next_seq": next_seq, "series": series,
    }


def _outgoing(frame: Frame, seq: int, stamp: bool) -> Frame:
    """The frame as sent: new seq, and the send time as t_ns when stamping (source untouched)."""
    if not stamp:
        return dataclasses.replace(frame, seq=seq)
    attrs = dict(frame.attrs)
    attrs["recorded_t_ns"] = int(frame.t_ns)
    return dataclasses.replace(frame, seq=seq, t_ns=time.time_ns(), attrs=attrs)


def _send(sock: zmq.Socket, make_parts: Callable[[], list[Any]], stop: threading.Event,
          deadline: float | None = None) -> bool:
    """Send one multipart message once a receiver can take it, building it at that moment (so
    a send-time stamp is true); False if ``stop`` is set or ``deadline`` (monotonic s) passes
    first."""
    while True:
        if sock.poll(_POLL_MS, zmq.POLLOUT):
            try:
                sock.send_multipart(make_parts(), flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                pass
        if stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
            return False
