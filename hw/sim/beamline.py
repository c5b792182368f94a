"""The simulated beamline process body: the simulated IOC driving the frame renderer.

:class:`SimBeamline` serves the simulated IOC (:class:`hw.sim.ioc.SimIOC`, caproto, on
127.0.0.1) and publishes the frames of :class:`hw.sim.detector.Simulator` on the wire protocol
from a PUSH socket bound to ``bind``. ``txmlive sim`` is ``SimBeamline(...).serve(stop)``.

Acquisition
-----------
While ``CAM:Acquire`` is ``Acquire`` the camera starts an exposure every
``max(1/fps, CAM:AcquireTime)`` s on an absolute schedule (no drift; a camera cannot start
frames faster than it exposes them). A frame:

1. takes :meth:`SimIOC.snapshot` at exposure start ``t_start`` (monotonic) with
   ``time.time_ns()`` as the frame's ``t_ns``; its ``positions`` are the readbacks of every
   motor role then, ``energy_ev`` the ``ENERGY`` readback;
2. is rendered at once (:meth:`Simulator.render`, on the simulation clock that starts at 0 when
   the beamline starts): the exposure ``[t_start, t_start + CAM:AcquireTime]`` is modelled,
   not slept through;
3. is read out (numbered, published) only once that window is over, because ``moving`` says
   whether any motor moved during it (:meth:`SimIOC.moved_between` over all motor roles:
   every one of them either is driven by a feedback loop or changes the image, so a frame
   taken while any moved is no clean measurement). The next exposure may start before the
   read-out is done, as on a camera that reads out while it integrates, so the overhead of
   the loop does not stretch the period.

A render slower than the period makes the camera run as fast as it can (the schedule restarts
when it is a whole period late, without a burst to catch up); the status line (every
:data:`STATUS_PERIOD_S`) and :meth:`SimBeamline.summary` report the achieved rate.
``CAM:ArrayCounter_RBV`` counts the frames read out (it is the frame's ``seq``, from 1) and
the ``TRUTH:`` PVs follow the ground truth of each frame read out.

Frame kinds follow areaDetector's ``CAM:FrameType`` (Normal → ``data``, Background → ``dark``,
FlatField → ``flat``); the pixels follow the physics. Closing ``SHUTTER`` or putting
``RING:CURRENT`` to 0 therefore gives dark *pixels* in ``data``-tagged frames, as on a real
beamline; a client that wants dark references sets ``FrameType = Background``. Each frame's
``attrs`` say ``frame_type``, ``shutter_open``, ``ring_current_ma`` and the true ``pixel_nm``.

Delivery
--------
A PUSH socket with no peer (or a full queue) refuses a message; the camera does not wait for
its consumer: a frame that cannot be queued before the next exposure is due is dropped and
counted as undelivered (its ``seq`` is skipped, so the consumer sees the gap). The IOC runs in
its own thread and never waits on the frame loop. Stopping sends no ``end`` frame: a detector
does not end the series, and a pipeline keeps running across restarts of the simulator.

Motors
------
The start positions are :meth:`Simulator.default_state` (the shaker amplitude that fills the
zone plate for this detector size) with the energy given and the zone plate at the nominal
focus of that energy. ``CAM:AcquireTime`` starts at the default 0.05 s, or at the frame period
if that is shorter (a 40 Hz shaker then completes fewer periods per exposure, and exposures
holding a fraction of a period give flats that vary: tune ``SHAKER:FREQ``). The ZP z travel
spans the nominal focus over the whole energy range (5–14 keV: −7.94 mm … +16.49 mm around
the 8 keV focus with the default optics, the focus moving ~2.7 µm/eV near 8 keV) plus
:data:`ZP_Z_MARGIN_UM` on each side, at :data:`ZP_Z_VELOCITY_UM_S`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import zmq

from hw import pvnames
from hw.epics_env import LOOPBACK
from hw.sim import optics
from hw.sim.detector import ENERGY_RANGE_EV, BeamlineState, SimParams, Simulator
from hw.sim.ioc import SimIOC, SimIOCConfig, default_motors
from stream.frame import Frame
from stream.wire import encode

log = logging.getLogger(__name__)

SERIES = "sim"
"""``series`` of every frame the simulated camera publishes."""

ZP_Z_MARGIN_UM = 1000.0
"""ZP z travel beyond the nominal focus at the ends of the energy range, µm."""

MAX_FOCUS_OFFSET_UM = 0.5 * ZP_Z_MARGIN_UM
"""Largest hidden focus offset: the true focus stays well within the travel, µm."""

ZP_Z_VELOCITY_UM_S = 200.0
"""ZP z speed, µm/s (a stepper stage; 16.5 mm from the 8 keV to the 14 keV focus in 82 s)."""

SEND_HWM = 8
"""Frames the PUSH socket queues for a slow consumer before it refuses more."""

SEND_POLL_S = 0.05
"""Longest wait on the socket between checks of the stop event, s."""

IDLE_POLL_S = 0.05
"""How often a camera that is not acquiring looks at ``CAM:Acquire``, s."""

STATUS_PERIOD_S = 5.0
"""Period of the status log line, s."""

FPS_WINDOW = 32
"""Exposure starts over which the achieved frame rate is measured."""


def nominal_focus_z_um(params: SimParams, energy_ev: float) -> float:
    """ZP z motor position of the nominal focus at ``energy_ev`` (no hidden offset), µm.

    0 at the reference energy; it grows with energy as the focal length does.
    """
    args = (params.zp_diameter_um, params.zp_dr_nm, params.sample_detector_mm * 1e3)
    return (optics.in_focus_zp_um(energy_ev, *args)
            - optics.in_focus_zp_um(params.energy_ref_ev, *args))


def zp_z_travel_um(params: SimParams, margin_um: float = ZP_Z_MARGIN_UM) -> tuple[float, float]:
    """Soft limits ``(low, high)`` of ZP z: the nominal focus over the energy range ± margin, µm.

    The in-focus position grows monotonically with energy, so the ends of
    :data:`hw.sim.detector.ENERGY_RANGE_EV` bound it.
    """
    if not (math.isfinite(margin_um) and margin_um >= 0):
        raise ValueError(f"margin_um must be a finite number >= 0, got {margin_um!r}")
    low_ev, high_ev = ENERGY_RANGE_EV
    return (nominal_focus_z_um(params, low_ev) - margin_um,
            nominal_focus_z_um(params, high_ev) + margin_um)


def _state_from_snapshot(snap: dict[str, Any]) -> BeamlineState:
    # Motor roles are named as the BeamlineState fields they set.
    return BeamlineState(
        **snap["positions"], shutter_open=snap["shutter_open"],
        ring_current_ma=snap["ring_current_ma"], exposure_s=snap["exposure_s"],
        frame_type=snap["frame_type"])


@dataclass(frozen=True)
class _Exposure:
    """A rendered exposure waiting for its window to close before it is read out."""

    snap: dict[str, Any]
    t_ns: int
    state: BeamlineState
    image: np.ndarray
    truth: dict[str, Any]
    render_s: float

    @property
    def t_end(self) -> float:
        """End of the exposure window, monotonic s."""
        return self.snap["t_monotonic"] + self.state.exposure_s


class SimBeamline:
    """The simulated TXM beamline: IOC + camera publishing frames (``txmlive sim``).

    Parameters
    ----------
    prefix : str
        PV prefix of the IOC.
    ca_port : int
        CA server port (UDP search and first-choice TCP), on 127.0.0.1.
    bind : str
        ZMQ endpoint the frame PUSH socket binds.
    size : int
        Detector size N (frames N × N uint16).
    fps : float
        Requested frame rate, 1/s (> 0).
    energy_ev : float
        Start energy, eV (5000–14000); the ZP starts at the nominal focus there.
    focus_offset_um : float
        Hidden shift of the true focus from the nominal, µm (|·| ≤
        :data:`MAX_FOCUS_OFFSET_UM`); clients see it only through ``TRUTH:FOCUS_Z_UM``.
    beam_drift_px_per_s : float
        Drift of the illumination spot, reference px/s (≥ 0).
    beam_jump_px, beam_jump_interval_s : float
        Size of the spot's sudden jumps, reference px, and their mean interval, s (``inf``:
        none); see :class:`~hw.sim.detector.SimParams`.
    vibration_nm : float
        Random per-frame image shift, RMS per axis, nm (≥ 0).
    seed : int
        Seed of every random process of the simulation.
    sample : str
        One of :data:`hw.sim.samples.SAMPLES`.

    Notes
    -----
    Construction validates and builds everything without I/O; :meth:`start` serves the IOC and
    binds the socket, :meth:`run` is the frame loop (in the calling thread), :meth:`close`
    releases the ports; :meth:`serve` does all three. ``summary`` may be called from any
    thread.
    """

    def __init__(self, *, prefix: str = pvnames.DEFAULT_SIM_PREFIX, ca_port: int = 5064,
                 bind: str = "tcp://127.0.0.1:5555", size: int = 2048, fps: float = 10.0,
                 energy_ev: float = 8000.0, focus_offset_um: float = 0.0,
                 beam_drift_px_per_s: float = 0.1, beam_jump_px: float = 20.0,
                 beam_jump_interval_s: float = 600.0, vibration_nm: float = 2.0, seed: int = 0,
                 sample: str = "siemens") -> None:
        if isinstance(fps, bool) or not isinstance(fps, int | float) \
                or not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a finite number > 0, got {fps!r}")
        if not isinstance(bind, str) or "://" not in bind:
            raise ValueError(f"bind must be a ZMQ endpoint like tcp://127.0.0.1:5555, got "
                             f"{bind!r}")
        if not (isinstance(focus_offset_um, int | float)
                and abs(focus_offset_um) <= MAX_FOCUS_OFFSET_UM):
            raise ValueError(f"focus_offset_um must be within ±{MAX_FOCUS_OFFSET_UM:g} µm, got "
                             f"{focus_offset_um!r}")
        lo_ev, hi_ev = ENERGY_RANGE_EV
        if not (isinstance(energy_ev, int | float) and lo_ev <= energy_ev <= hi_ev):
            raise ValueError(f"energy_ev must be in {lo_ev:g}..{hi_ev:g} eV, got {energy_ev!r}")
        self.params = SimParams(
            size_px=size, sample=sample, seed=seed, focus_offset_um=float(focus_offset_um),
            drift_px_per_s=beam_drift_px_per_s, jump_px=beam_jump_px,
            jump_interval_s=beam_jump_interval_s, vibration_rms_nm=vibration_nm)
        self.prefix = prefix
        self.bind = bind
        self.fps = float(fps)
        self.simulator = Simulator(self.params)
        default = self.simulator.default_state()
        # --fps is honoured from the start: the exposure fits in the period
        start = replace(default, energy_ev=float(energy_ev),
                        zp_z_um=nominal_focus_z_um(self.params, float(energy_ev)),
                        exposure_s=min(default.exposure_s, 1.0 / self.fps))
        low, high = zp_z_travel_um(self.params)
        motors = default_motors(zp_z_nominal_um=0.5 * (low + high),
                                zp_z_range_um=0.5 * (high - low), energy_ev=float(energy_ev),
                                initial={role: getattr(start, role)
                                         for role in pvnames.MOTOR_ROLES})
        motors["zp_z_um"] = replace(motors["zp_z_um"], velocity=ZP_Z_VELOCITY_UM_S)
        # The shaker's travel matches the simulated condenser: circles up to two field widths
        # (the illumination grid; wider ones throw the light away), so a scan over the whole
        # travel samples the scaled-down field as finely at 256 px as at 2048 px.
        motors["shaker_amp_um"] = replace(motors["shaker_amp_um"],
                                          high=2.0 * self.params.reference_field_um)
        self.ioc = SimIOC(
            SimIOCConfig(motors=motors, exposure_s=start.exposure_s,
                         frame_type=start.frame_type, shutter_open=start.shutter_open,
                         ring_current_ma=start.ring_current_ma),
            prefix=prefix, port=ca_port, host=LOOPBACK)
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._t_origin = 0.0
        self._lock = threading.Lock()
        self._seq = 0
        self._rendered = 0
        self._sent = 0
        self._undelivered = 0
        self._render_errors = 0
        self._last_error = ""
        self._last_render_s = math.nan
        self._starts: deque[float] = deque(maxlen=FPS_WINDOW)
        self._acquiring = False
        self._last_status = 0.0

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Serve the IOC and bind the frame socket (raises if either fails)."""
        self.ioc.start()
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.bind)
        except zmq.ZMQError as err:
            sock.close()
            ctx.term()
            self.ioc.stop()
            raise ValueError(f"cannot bind the frame socket to {self.bind!r}: {err}") from None
        self._ctx, self._sock = ctx, sock
        self._poller.register(sock, zmq.POLLOUT)
        self._t_origin = time.monotonic()
        self._last_status = self._t_origin
        log.info("simulated beamline: IOC %s on CA port %d, frames on %s, %d² at %g fps",
                 self.prefix, self.ioc.port, self.bind, self.params.size_px, self.fps)

    def close(self) -> None:
        """Close the socket and stop the IOC (idempotent); no ``end`` frame is sent."""
        if self._sock is not None:
            self._poller.unregister(self._sock)
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        self.ioc.stop()

    def serve(self, stop: threading.Event) -> dict[str, Any]:
        """Start, publish frames until ``stop`` is set, close; returns :meth:`summary`."""
        self.start()
        try:
            self.run(stop)
        finally:
            self.close()
        summary = self.summary()
        log.info("simulated beamline stopped: %s", summary)
        return summary

    def __enter__(self) -> SimBeamline:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- counters --------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Counters (thread safe).

        Returns
        -------
        dict
            ``seq`` (last frame number = ``CAM:ArrayCounter_RBV``), ``frames_rendered``,
            ``frames_sent``, ``frames_undelivered``, ``render_errors``, ``acquiring``,
            ``requested_fps``, ``achieved_fps`` (over the last :data:`FPS_WINDOW` exposure
            starts; 0 when none started for two periods), ``last_render_ms``. Every frame
            read out is either sent or undelivered: ``frames_rendered = frames_sent +
            frames_undelivered`` except during the send of a frame. Exposures that cannot be
            rendered (a state outside the model, logged) count as ``render_errors`` only.
        """
        with self._lock:
            starts = list(self._starts)
            out = {
                "seq": self._seq,
                "frames_rendered": self._rendered,
                "frames_sent": self._sent,
                "frames_undelivered": self._undelivered,
                "render_errors": self._render_errors,
                "acquiring": self._acquiring,
                "requested_fps": self.fps,
                "last_render_ms": self._last_render_s * 1e3,
            }
        achieved = 0.0
        if len(starts) >= 2 and time.monotonic() - starts[-1] < 2.0 * self._period(starts):
            achieved = (len(starts) - 1) / (starts[-1] - starts[0])
        out["achieved_fps"] = achieved
        return out

    def _period(self, starts: list[float]) -> float:
        return max(1.0 / self.fps, (starts[-1] - starts[0]) / (len(starts) - 1))

    def _status(self, now: float) -> None:
        if now - self._last_status < STATUS_PERIOD_S:
            return
        self._last_status = now
        s = self.summary()
        log.info("sim: seq %d, rendered %d, sent %d, undelivered %d, errors %d, "
                 "%.1f/%.1f fps, render %.1f ms%s", s["seq"], s["frames_rendered"],
                 s["frames_sent"], s["frames_undelivered"], s["render_errors"],
                 s["achieved_fps"], s["requested_fps"], s["last_render_ms"],
                 "" if s["acquiring"] else ", not acquiring")

    # -- the frame loop --------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Acquire and publish frames until ``stop`` is set (noticed within ~0.1 s).

        Exposures start on the absolute schedule ``next_due``; each is read out (sent) once
        its window has passed, so the next exposure can start while the previous one is still
        open by the loop's own overhead, as on a camera that reads out while it integrates.
        Exposures still open when ``stop`` is set are never read out (nor counted).
        """
        if self._sock is None:
            raise RuntimeError("SimBeamline.run before start()")
        period = 1.0 / self.fps
        next_due: float | None = None
        pending: deque[_Exposure] = deque()
        while not stop.is_set():
            now = time.monotonic()
            self._status(now)
            if pending and now >= pending[0].t_end:
                deadline = next_due if next_due is not None else now + period
                self._read_out(pending.popleft(), max(deadline, now), stop)
                continue
            snap = self.ioc.snapshot()
            acquiring = bool(snap["acquire"])
            with self._lock:
                self._acquiring = acquiring
            if not acquiring:
                next_due = None
            else:
                start = snap["t_monotonic"]
                # a camera cannot start frames faster than it exposes them
                frame_period = max(period, snap["exposure_s"])
                if next_due is None or start - next_due > frame_period:
                    next_due = start  # first frame, or a whole period late: restart here
                if start >= next_due:
                    exposure = self._expose(snap, time.time_ns())
                    if exposure is not None:
                        pending.append(exposure)
                    next_due += frame_period
                    continue
            wake = [now + IDLE_POLL_S] if next_due is None else [next_due]
            if pending:
                wake.append(pending[0].t_end)
            stop.wait(max(min(wake) - time.monotonic(), 0.0))

    def _expose(self, snap: dict[str, Any], t_ns: int) -> _Exposure | None:
        """Render the exposure that starts at ``snap`` (None if the state cannot be imaged)."""
        t_start = snap["t_monotonic"]
        with self._lock:
            self._starts.append(t_start)
        state = _state_from_snapshot(snap)
        tick = time.perf_counter()
        try:
            image, truth = self.simulator.render(state, t_start - self._t_origin)
        except ValueError as err:  # e.g. a client widened a limit and drove the ZP too far
            self._render_failed(str(err))
            return None
        return _Exposure(snap=snap, t_ns=t_ns, state=state, image=image, truth=truth,
                         render_s=time.perf_counter() - tick)

    def _read_out(self, exposure: _Exposure, deadline: float, stop: threading.Event) -> None:
        """Number, publish and send a finished exposure; retry sending until ``deadline``."""
        state, truth, snap = exposure.state, exposure.truth, exposure.snap
        with self._lock:
            self._seq += 1
            self._rendered += 1
            self._last_render_s = exposure.render_s
            seq = self._seq
        self.ioc.set_array_counter(seq)
        self.ioc.set_truth(**{key: truth[key] for key in pvnames.TRUTH_PVS})
        frame = Frame(
            seq=seq, t_ns=exposure.t_ns, kind=truth["kind"], image=exposure.image,
            exposure_s=state.exposure_s, energy_ev=state.energy_ev,
            positions=dict(snap["positions"]),
            moving=self.ioc.moved_between(snap["t_monotonic"], exposure.t_end),
            series=SERIES,
            attrs={"pixel_nm": truth["pixel_nm"], "frame_type": state.frame_type,
                   "shutter_open": state.shutter_open,
                   "ring_current_ma": state.ring_current_ma})
        delivered = self._send(encode(frame), deadline, stop)
        with self._lock:
            if delivered:
                self._sent += 1
            else:
                self._undelivered += 1

    def _render_failed(self, message: str) -> None:
        with self._lock:
            self._render_errors += 1
            repeated = message == self._last_error
            self._last_error = message
        if not repeated:
            log.error("sim: frame not rendered: %s", message)

    def _send(self, parts: list[Any], deadline: float, stop: threading.Event) -> bool:
        """Queue ``parts`` without blocking; retry until ``deadline`` (monotonic s)."""
        while True:
            try:
                self._sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or stop.is_set():
                return False
            self._poller.poll(1e3 * min(remaining, SEND_POLL_S))
