"""The feedback runtime hosted in ``txmlive run``: the continuous beam loop and the operator's
controls (the pipeline's PV server) for the one-shot procedures.

Threads
-------
- The pipeline's publisher thread hands every Result to :meth:`FeedbackRuntime.on_result`,
  which returns at once: it appends it to the executor's
  :class:`~feedback.results.ResultBuffer` and puts it in a keep-latest slot for the beam loop.
- The *control* thread takes the operator's commands (``PvServer.commands``,
  :class:`hw.pvserver.PvCommand`): ``AF:START``, ``AF:ABORT``, ``SHAKER:TUNE``,
  ``BEAMFB:ENABLE``, ``BEAMFB:SETPOINT_X_PX`` / ``_Y_PX``. It never touches a motor: starts and
  settings become jobs for the executor thread; an abort goes straight to
  :meth:`~feedback.executor.Executor.abort` (which only raises a flag).
- The *executor* thread is the one thread that puts: it runs the jobs (autofocus, shaker
  tuning, the steering calibration) through the :class:`~feedback.executor.Executor` and,
  between jobs, the beam loop (:class:`feedback.beam.BeamFeedback`) on the newest Result.

Beam loop
---------
``BEAMFB:ENABLE`` On connects the steering motors and, when the config holds no response
matrix, first runs the calibration (:func:`feedback.beam.calibrate_response`); a calibration
that is not ``resolved`` switches the enable back Off and says why in ``BEAMFB:STATE``. The
setpoints come from the config (``[feedback] beam_setpoints``, energy dependent) or, without
any, are the centroid of the first frame after enabling (hold the beam where it is); a put to
``BEAMFB:SETPOINT_X_PX`` / ``_Y_PX`` replaces that axis (one setpoint at every energy from then
on). Setpoints are in full-frame px, the unit of the centroid metrics (``BEAM:X_PX``). While a
one-shot procedure runs the beam loop is off (its moves would spoil the procedure's frames)
and it restarts bumplessly after. A move that fails pauses the loop (IOC disconnect) until the
steering motors read again. In dry-run the loop logs the moves it would make from the real
positions.

State PVs: ``AF:STATE`` (``idle``/``running``/``aborting``), ``AF:VERDICT``, ``AF:BEST_Z_UM``;
``SHAKER:VERDICT`` (``running`` while it runs); ``BEAMFB:STATE`` (``off``, ``calibrating``,
``waiting``, ``running``, ``paused: <reason>``, ``off: <why>``) and ``BEAMFB:ERROR_PX`` (the
length of the centroid error, px).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from feedback.autofocus import AutofocusConfig, autofocus
from feedback.beam import (
    BeamConfig,
    BeamFeedback,
    BeamStep,
    CalibrationConfig,
    LoopState,
    ResponseMatrix,
    SetpointTable,
    calibrate_response,
)
from feedback.commands import MoveDone, Result, Verdict
from feedback.executor import Executor, RoleSettings, RunReport, build_guard
from feedback.optics import ZonePlate
from feedback.results import result_kind
from feedback.safety import Guard, MoveRefused, PauseReason, finite_or_none, metric
from feedback.shaker import ShakerConfig, tune_shaker
from hw.actuators import LimitError, MoveError
from stream.queues import LatestSlot

log = logging.getLogger(__name__)

CA_STRING_BYTES = 39
"""Longest string a CA string record holds."""

RECONNECT_PROBE_S = 1.0
"""How often a loop paused for an IOC disconnect checks whether the motors read again, s."""


class StateSink(Protocol):
    """Where the runtime reports its state (the PV server's ``set_state``)."""

    def set_state(self, **values: str | float | bool) -> None: ...


def ca_string(text: str) -> str:
    """``text`` cut to what a CA string record holds (39 bytes of UTF-8)."""
    data = text.encode()
    if len(data) <= CA_STRING_BYTES:
        return text
    return data[:CA_STRING_BYTES].decode(errors="ignore")


def response_from_result(result: dict[str, Any]) -> ResponseMatrix:
    """The :class:`ResponseMatrix` of a resolved calibration's ``Done.result``."""
    response = result["response"]
    matrix = tuple(tuple(float(v) for v in row) for row in response["px_per_unit"])
    return ResponseMatrix(matrix, response.get("pixel_nm"), tuple(response["roles"]))


@dataclass(frozen=True)
class LoopSettings:
    """Everything the runtime needs besides the hardware.

    Attributes
    ----------
    roles : RoleSettings
        Per-role maximum step, tolerance and soft limits (the guard).
    zone_plate : ZonePlate
    autofocus : AutofocusConfig
    shaker : ShakerConfig
    calibration : CalibrationConfig
        The steering calibration (its roles are the steering roles).
    beam : BeamConfig
    response : ResponseMatrix or None
        Steering response; None: calibrate when the loop is first enabled.
    setpoints : SetpointTable or None
        Centroid setpoints; None: hold the centroid found when the loop is enabled.
    state_period_s : float
        The beam state PVs are written at most this often (and on every change of state).
    """

    roles: RoleSettings
    zone_plate: ZonePlate = field(default_factory=ZonePlate)
    autofocus: AutofocusConfig = field(default_factory=AutofocusConfig)
    shaker: ShakerConfig = field(default_factory=ShakerConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    beam: BeamConfig = field(default_factory=BeamConfig)
    response: ResponseMatrix | None = None
    setpoints: SetpointTable | None = None
    state_period_s: float = 0.1


class FeedbackRuntime:
    """The beam loop and the operator's controls, on top of one :class:`Executor`.

    Parameters
    ----------
    executor : Executor
        Fed by :meth:`on_result` (its ``results`` buffer).
    settings : LoopSettings
    commands : queue.Queue, optional
        Operator commands with ``name`` and ``value`` (``PvServer.commands``).
    state : StateSink, optional
        Receives the state values (``PvServer``).
    clock_ns : callable
        Wall clock, ns since the epoch.

    Attributes
    ----------
    reports : dict of str to RunReport
        The last report of each procedure (``autofocus``, ``shaker``, ``beam-calibration``).
    """

    def __init__(self, executor: Executor, settings: LoopSettings, *,
                 commands: queue.Queue | None = None, state: StateSink | None = None,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.executor = executor
        self.settings = settings
        self.commands = commands
        self.state = state
        self._clock_ns = clock_ns
        self._jobs: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._latest: LatestSlot[Result] = LatestSlot()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._busy = threading.Lock()  # held from a procedure's request to its end
        self.reports: dict[str, RunReport] = {}
        # beam loop, touched on the executor thread only
        self._response = settings.response
        self._beam_on = False
        self._beam: BeamFeedback | None = None
        self._beam_guard: Guard | None = None
        self._override: dict[str, float] = {}
        self._last_energy: float | None = None
        self._beam_state_text = ""
        self._beam_state_ns = 0
        self._next_probe_ns = 0

    # -- inputs (any thread) ---------------------------------------------------------------

    def on_result(self, result: Result) -> None:
        """A Result from the pipeline (publisher thread): hand it on and return at once."""
        self.executor.results.push(result)
        self._latest.put(result)

    def start_autofocus(self) -> bool:
        """Queue an autofocus; False (and logged) while another procedure is queued or runs."""
        return self._request("autofocus")

    def start_shaker_tuning(self) -> bool:
        """Queue a shaker tuning; False while another procedure is queued or runs."""
        return self._request("shaker")

    def abort(self, reason: str = "operator abort") -> bool:
        """Abort the running procedure, if any; whether one was running."""
        running = self.executor.running
        if running == "autofocus":
            self._set_state(af_state="aborting")
        return self.executor.abort(reason)

    def enable_beam(self, on: bool) -> None:
        """Switch the beam loop on (calibrating first if needed) or off."""
        if not on and self.executor.running == "beam-calibration":
            self.executor.abort("beam loop disabled")
        self._jobs.put(("beam", bool(on)))

    def set_setpoint(self, axis: str, value_px: float) -> None:
        """A new setpoint for one axis (``"x"`` or ``"y"``), px, at every energy."""
        if axis not in ("x", "y"):
            raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
        if not math.isfinite(value_px):
            raise ValueError(f"setpoint must be finite, got {value_px!r}")
        self._jobs.put(("setpoint", (axis, float(value_px))))

    def handle_command(self, command: Any) -> None:
        """One operator command (a :class:`hw.pvserver.PvCommand`)."""
        name, value = command.name, command.value
        if name == "af_start":
            self.start_autofocus()
        elif name == "af_abort":
            self.abort("operator abort (AF:ABORT)")
        elif name == "shaker_tune":
            self.start_shaker_tuning()
        elif name == "beamfb_enable":
            self.enable_beam(bool(value))
        elif name in ("beamfb_setpoint_x_px", "beamfb_setpoint_y_px"):
            self.set_setpoint(name[len("beamfb_setpoint_")], float(value))
        else:
            log.warning("unknown feedback command %r ignored", name)

    def _request(self, name: str) -> bool:
        if not self._busy.acquire(blocking=False):
            log.warning("%s requested while %s runs; ignored", name,
                        self.executor.running or "another procedure")
            return False
        self._jobs.put((name, None))
        return True

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the executor thread (and the control thread when there are commands)."""
        if self._threads:
            raise RuntimeError("FeedbackRuntime already started")
        self._set_state(af_state="idle", beamfb_state="off")
        targets = [("feedback-executor", self._executor_loop)]
        if self.commands is not None:
            targets.append(("feedback-control", self._control_loop))
        for name, target in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Abort what runs, switch the beam loop off and join the threads (idempotent)."""
        self._stop.set()
        self.executor.abort("feedback runtime stopping")
        for thread in self._threads:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("%s did not stop within %s s", thread.name, timeout_s)

    def _control_loop(self) -> None:
        while not self._stop.is_set():
            try:
                command = self.commands.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.handle_command(command)
            except Exception:  # a bad command must not end operator control
                log.exception("feedback command %r failed", command)

    def _executor_loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.02 if self._beam_on else 0.2)
            except queue.Empty:
                job = None
            try:
                if job is not None:
                    self._do(*job)
                if self._beam_on and not self._stop.is_set():
                    self._beam_cycle()
            except Exception:  # report and go on: the loops must outlive one bad cycle
                log.exception("feedback executor job %r failed", job)
        if self._beam is not None:
            self._beam.disable()
        self._set_state(beamfb_state="off")

    # -- jobs (executor thread) ------------------------------------------------------------

    def _set_state(self, **values: Any) -> None:
        if self.state is None:
            return
        try:
            self.state.set_state(**values)
        except Exception:  # the server may be stopping; state is best effort
            log.exception("reporting feedback state %r failed", values)

    def _do(self, name: str, value: Any) -> None:
        if name == "beam":
            self._switch_beam(value)
        elif name == "setpoint":
            self._setpoint(*value)
        else:
            try:
                self._procedure(name)
            finally:
                self._busy.release()

    def _guard(self, roles: tuple[str, ...]) -> Guard:
        return build_guard(self.executor.actuators, roles, self.settings.roles)

    def _procedure(self, name: str) -> None:
        settings = self.settings
        if name == "autofocus":
            self._set_state(af_state="running", af_verdict="", af_best_z_um=math.nan)
            roles: tuple[str, ...] = (settings.autofocus.role,)
        else:
            self._set_state(shaker_verdict="running")
            roles = (settings.shaker.amp_role, settings.shaker.freq_role)
        beam_was_on = self._beam_on and self._beam is not None
        if beam_was_on:
            self._beam.disable()
            self._publish_beam("paused: " + name, None, force=True)
        try:
            guard = self._guard(roles)
        except (ConnectionError, ValueError) as exc:
            log.error("%s cannot start: %s", name, exc)
            verdict = f"aborted: {exc}"
            self._finish(name, None, ca_string(verdict))
        else:
            procedure = (autofocus(guard, settings.zone_plate, settings.autofocus)
                         if name == "autofocus" else tune_shaker(guard, settings.shaker))
            report = self.executor.run(procedure, guard, name=name)
            self.reports[name] = report
            self._finish(name, report, str(report.verdict))
        if beam_was_on and self._beam_on:
            self._beam.enable(self._clock_ns())

    def _finish(self, name: str, report: RunReport | None, verdict: str) -> None:
        if name == "autofocus":
            best = None if report is None else finite_or_none(report.done.result.get("best_z_um"))
            self._set_state(af_state="idle", af_verdict=verdict,
                            af_best_z_um=math.nan if best is None else best)
        else:
            self._set_state(shaker_verdict=verdict)

    def _switch_beam(self, on: bool) -> None:
        if not on:
            self._beam_on = False
            if self._beam is not None:
                self._beam.disable()
            self._publish_beam("off", None, force=True)
            return
        if self._beam_on:
            return
        try:
            guard = self._guard(tuple(self.settings.calibration.roles))
        except (ConnectionError, ValueError) as exc:
            self._beam_off(f"off: {exc}")
            return
        if self._response is None:
            self._publish_beam("calibrating", None, force=True)
            report = self.executor.run(calibrate_response(guard, self.settings.calibration),
                                       guard, name="beam-calibration", rollback_verdicts=())
            self.reports["beam-calibration"] = report
            if report.verdict != Verdict.RESOLVED:
                self._beam_off(f"off: calibration {report.verdict}")
                return
            self._response = response_from_result(dict(report.done.result))
            log.info("beam loop: measured response %s (put it in [feedback] beam_response to "
                     "skip the calibration)", self._response.as_dict())
        # a new controller: its setpoints are settled on the first frame (held if none given)
        self._beam_guard, self._beam = guard, None
        self._beam_on = True
        self._publish_beam("waiting", None, force=True)

    def _beam_off(self, why: str) -> None:
        self._beam_on = False
        self._publish_beam(why, None, force=True)
        self._set_state(beamfb_enable=False)

    def _setpoint(self, axis: str, value_px: float) -> None:
        self._override[axis] = value_px
        if self._beam is not None:
            base = self._beam.setpoints.at(self._last_energy)
            x = self._override.get("x", float(base[0]))
            y = self._override.get("y", float(base[1]))
            self._beam.set_setpoint(x, y)
            self._show_setpoint(self._beam)

    def _make_beam(self, result: Result) -> BeamFeedback | None:
        """The controller, once the setpoints are known (from the first frame if held)."""
        table = self.settings.setpoints
        override = self._override
        if table is None or override:
            if table is not None:
                base = table.at(finite_or_none(result.get("energy_ev")))
            else:
                base = (metric(result, "centroid_x_px"), metric(result, "centroid_y_px"))
            x, y = override.get("x", base[0]), override.get("y", base[1])
            if x is None or y is None:
                return None
            table = SetpointTable.constant(x, y)
        beam = BeamFeedback(self._beam_guard, self._response, table, self.settings.beam)
        beam.enable(self._clock_ns())
        log.info("beam loop: setpoints %s px", table.as_list())
        self._show_setpoint(beam)
        return beam

    def _show_setpoint(self, beam: BeamFeedback) -> None:
        """Put the setpoint the loop holds now (at the last energy) on the setpoint PVs."""
        x, y = beam.setpoints.at(self._last_energy)
        self._set_state(beamfb_setpoint_x_px=float(x), beamfb_setpoint_y_px=float(y))

    def _beam_cycle(self) -> None:
        result = self._latest.take(0)
        now = self._clock_ns()
        if result is not None and result_kind(result) != "data":
            result = None
        if result is not None:
            self._last_energy = finite_or_none(result.get("energy_ev")) or self._last_energy
        if self._beam is None:
            if result is None:
                return
            self._beam = self._make_beam(result)
            if self._beam is None:
                return
        beam = self._beam
        step = beam.update(result, now) if result is not None else beam.tick(now)
        for move in step.moves:
            try:
                done = self.executor.apply(move, self._beam_guard, run="beam")
            except MoveRefused as exc:
                self._beam.disable()
                self._beam_off(ca_string(f"off: refused {exc.why}"))
                return
            except (ConnectionError, TimeoutError, LimitError, MoveError) as exc:
                beam.pause(PauseReason.IOC_DISCONNECT, str(exc))
                self._next_probe_ns = now + int(RECONNECT_PROBE_S * 1e9)
                break
            if self.executor.dry_run:
                # nothing moved: the controller goes on from where the motors really are
                done = MoveDone(move.role, move.rollback, move.rollback, done.t_done_ns)
            beam.moved(done)
        if step.state == LoopState.PAUSED and now >= self._next_probe_ns:
            self._probe_reconnect(beam, now)
        self._publish_step(beam.state, beam.reason, step)

    def _probe_reconnect(self, beam: BeamFeedback, now: int) -> None:
        self._next_probe_ns = now + int(RECONNECT_PROBE_S * 1e9)
        try:
            for role in beam.roles:
                _ = self.executor.actuators[role].position
        except (ConnectionError, KeyError):
            return
        beam.resume(PauseReason.IOC_DISCONNECT)

    def _publish_step(self, state: LoopState, reason: str | None, step: BeamStep) -> None:
        text = f"paused: {reason}" if state == LoopState.PAUSED else str(state)
        self._publish_beam(text, step.error_px)

    def _publish_beam(self, text: str, error_px: tuple[float, float] | None, *,
                      force: bool = False) -> None:
        now = self._clock_ns()
        text = ca_string(text)
        if not force and text == self._beam_state_text \
                and now - self._beam_state_ns < self.settings.state_period_s * 1e9:
            return
        self._beam_state_text, self._beam_state_ns = text, now
        error = math.nan if error_px is None else math.hypot(*error_px)
        self._set_state(beamfb_state=text, beamfb_error_px=error)

