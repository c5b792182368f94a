"""The feedback commands (``txmlive autofocus``, ``tune-shaker``, ``energy-scan``) and the
feedback runtime of ``txmlive run``: configuration, EPICS and results-stream wiring.

Each command finds what ``txmlive run`` uses, from the same config: the pipeline's results
stream (``[endpoints] results``, or ``--results URL``) and the beamline's motors
(``[epics] beamline_prefix`` + the ``[motors]`` role map, reached over Channel Access at
127.0.0.1:``beamline_ca_port`` and every ``beamline_ca_addr``). It runs one procedure through
the :class:`~feedback.executor.Executor` in this process, prints progress to stderr and, with
``--json``, exactly one JSON object to stdout: the procedure's result (``verdict``,
``reason``, its numbers), ``duration_s``, ``dry_run``, ``rolled_back`` and the ``actions``
log. SIGINT/SIGTERM abort the procedure (motion stops; verdict ``aborted``).

Exit codes: 0 when the procedure ended with a verdict other than ``aborted`` (or a dry run
ended where its plan needs a frame at a position never reached); 1 when it was aborted or a
step before it failed (the message names the step; with ``--json`` the object
then has ``verdict`` ``aborted``, ``step`` and ``reason``); 2 for a bad command line or
config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from hw import pvnames
from txmlive.config import Config, ConfigError, Feedback

if TYPE_CHECKING:  # the feedback stack loads only when a feedback command runs (CLI start-up)
    from feedback.commands import Procedure
    from feedback.executor import (
        EpicsFrameType,
        Executor,
        LazyActuators,
        RoleSettings,
        RunReport,
    )
    from feedback.focus_tracking import TrackingConfig
    from feedback.results import ResultBuffer
    from feedback.runtime import FeedbackRuntime, LoopSettings

MAX_SCAN_STEPS = 10000
"""Most energies one ``energy-scan`` may visit."""


# -- configuration --------------------------------------------------------------------------

@dataclass(frozen=True)
class FeedbackSettings:
    """``[feedback]`` validated and turned into the controllers' settings.

    Attributes
    ----------
    loop : LoopSettings
        Guard settings, zone plate, autofocus, shaker, calibration and beam loop.
    tracking : TrackingConfig
        The energy scan.
    focus_points : list of (float, float)
        In-focus (energy_ev, zp_z_um) points (may be empty).
    focus_model : str
    dry_run : bool
    acquire_timeout_s, stale_after_s, move_settle_s : float
    """

    loop: LoopSettings
    tracking: TrackingConfig
    focus_points: list[tuple[float, float]]
    focus_model: str
    dry_run: bool
    acquire_timeout_s: float
    stale_after_s: float
    move_settle_s: float


def _number(where: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{where}: must be > 0, got {value!r}")
    return float(value)


def _per_role(name: str, values: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """A ``[feedback]`` role table merged over its defaults, roles checked."""
    if not isinstance(values, dict):
        raise ConfigError(f"[feedback] {name}: expected a table of role = value, got {values!r}")
    unknown = sorted(set(values) - set(pvnames.MOTOR_ROLES))
    if unknown:
        raise ConfigError(f"[feedback] {name}: unknown motor role(s) {unknown}; known: "
                          f"{sorted(pvnames.MOTOR_ROLES)}")
    return {**defaults, **values}


def _groups(name: str, values: list[float], size: int) -> list[tuple[float, ...]]:
    if len(values) % size:
        raise ConfigError(f"[feedback] {name}: expected groups of {size} numbers, got "
                          f"{len(values)} numbers")
    return [tuple(values[i:i + size]) for i in range(0, len(values), size)]


def _role_settings(fb: Feedback) -> RoleSettings:
    from feedback.executor import RoleSettings

    defaults = Feedback()
    max_step = {role: _number(f"[feedback] max_step {role}", v, positive=True)
                for role, v in _per_role("max_step", fb.max_step, defaults.max_step).items()}
    tolerance = {role: _number(f"[feedback] tolerance {role}", v)
                 for role, v in _per_role("tolerance", fb.tolerance, defaults.tolerance).items()}
    negative = sorted(role for role, v in tolerance.items() if v < 0)
    if negative:
        raise ConfigError(f"[feedback] tolerance: must be >= 0 for {negative}")
    limits = {}
    for role, pair in _per_role("soft_limits", fb.soft_limits, {}).items():
        if not isinstance(pair, list) or len(pair) != 2:
            raise ConfigError(f"[feedback] soft_limits {role}: expected [low, high], got {pair!r}")
        low, high = (_number(f"[feedback] soft_limits {role}", v) for v in pair)
        if low >= high:
            raise ConfigError(f"[feedback] soft_limits {role}: low {low:g} must be below high "
                              f"{high:g}")
        limits[role] = (low, high)
    return RoleSettings(max_step, tolerance, limits)


def feedback_settings(config: Config) -> FeedbackSettings:
    """Validate ``[feedback]`` (a :class:`ConfigError` names the bad key) and build settings."""
    from feedback.autofocus import AutofocusConfig
    from feedback.beam import (
        STEERING_ROLES,
        BeamConfig,
        CalibrationConfig,
        ResponseMatrix,
        SetpointTable,
        check_response,
    )
    from feedback.focus_tracking import TrackingConfig
    from feedback.optics import ZonePlate
    from feedback.runtime import LoopSettings
    from feedback.safety import IntensityRule
    from feedback.shaker import ShakerConfig

    fb = config.feedback
    roles = _role_settings(fb)
    intensity = IntensityRule(min_mean_counts=fb.min_mean_counts)
    try:
        zone_plate = ZonePlate(fb.zp_diameter_um, fb.zp_dr_nm, fb.sample_detector_mm * 1e3)
        af = AutofocusConfig(score_key=fb.af_score, half_range_dof=fb.af_half_range_dof,
                             coarse_points=fb.af_coarse_points,
                             refine_points=fb.af_refine_points,
                             frames_per_point=fb.af_frames_per_point,
                             max_frames_per_point=fb.af_max_frames_per_point,
                             backlash=fb.af_backlash_um, intensity=intensity)
        amp_range = fb.shaker_amp_range_um
        if amp_range and (len(amp_range) != 2 or not 0 <= amp_range[0] < amp_range[1]):
            raise ValueError(f"shaker_amp_range_um: expected [low, high] with 0 <= low < high, "
                             f"got {amp_range!r}")
        shaker = ShakerConfig(target_cv=fb.shaker_target_cv, n_amplitudes=fb.shaker_amplitudes,
                              amp_min_um=amp_range[0] if amp_range else None,
                              amp_max_um=amp_range[1] if amp_range else None,
                              flat_frames=fb.shaker_flat_frames,
                              measure_na_fill=fb.shaker_measure_na_fill)
        calibration = CalibrationConfig(delta=(fb.beam_calibration_step,) * 2,
                                        frames_per_point=fb.beam_calibration_frames,
                                        intensity=intensity)
        beam = BeamConfig(integral_gain=fb.beam_integral_gain,
                          proportional_gain=fb.beam_proportional_gain,
                          deadband_px=fb.beam_deadband_px, stale_after_s=fb.stale_after_s,
                          intensity=intensity)
        tracking = TrackingConfig(score_key=fb.af_score, frames_per_step=fb.scan_frames_per_step,
                                  drop_fraction=fb.scan_drop_fraction, intensity=intensity,
                                  refocus=replace(af, half_range_dof=min(1.5,
                                                                         fb.af_half_range_dof)))
    except ValueError as exc:
        raise ConfigError(f"[feedback] {exc}") from None
    response = None
    if fb.beam_response:
        if len(fb.beam_response) != 4:
            raise ConfigError(f"[feedback] beam_response: expected 4 numbers [dx/dux, dx/duy, "
                              f"dy/dux, dy/duy], got {fb.beam_response!r}")
        rxx, rxy, ryx, ryy = fb.beam_response
        response = ResponseMatrix(((rxx, rxy), (ryx, ryy)), fb.beam_response_pixel_nm or None,
                                  STEERING_ROLES)
        try:
            check_response(response, beam.max_condition)
        except ValueError as exc:
            raise ConfigError(f"[feedback] beam_response: {exc}") from None
    setpoints = None
    if fb.beam_setpoints:
        try:
            setpoints = SetpointTable(_groups("beam_setpoints", fb.beam_setpoints, 3))
        except ValueError as exc:
            raise ConfigError(f"[feedback] beam_setpoints: {exc}") from None
    points = [(e, z) for e, z in _groups("focus_points", fb.focus_points, 2)]
    if fb.focus_model == "linear" and len(points) < 2:
        raise ConfigError("[feedback] focus_model: the linear model needs at least two "
                          "focus_points")
    loop = LoopSettings(roles=roles, zone_plate=zone_plate, autofocus=af, shaker=shaker,
                        calibration=calibration, beam=beam, response=response,
                        setpoints=setpoints)
    return FeedbackSettings(loop, tracking, points, fb.focus_model, fb.dry_run,
                            fb.acquire_timeout_s, fb.stale_after_s, fb.move_settle_s)


# -- EPICS and results wiring ---------------------------------------------------------------

def configure_ca(config: Config) -> None:
    """Point this process's pyepics at the beamline's CA servers (before any pyepics call)."""
    from hw.epics_env import ca_client_env, configure_ca_client

    port, extra = config.epics.beamline_ca_port, config.epics.beamline_ca_addr
    if not extra:
        configure_ca_client([port])
        return
    import epics.ca

    if epics.ca.libca is not None:
        raise RuntimeError("pyepics was started before its CA address list was set")
    env = ca_client_env([port])
    env["EPICS_CA_ADDR_LIST"] += " " + " ".join(extra)
    os.environ.update(env)


class CaMotor:
    """An :class:`hw.actuators.EpicsMotor` whose Channel Access failures (pyepics raises its
    own exceptions, e.g. a get on a channel that just disconnected) reach the executor as the
    ``ConnectionError`` of an IOC disconnect."""

    def __init__(self, motor: Any) -> None:
        self._motor = motor
        self.name, self.unit = motor.name, motor.unit

    def _call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from feedback.executor import call_ca

        return call_ca(self.name, func, *args, **kwargs)

    @property
    def limits(self) -> tuple[float, float]:
        return self._call(lambda: self._motor.limits)

    @property
    def position(self) -> float:
        return self._call(lambda: self._motor.position)

    @property
    def moving(self) -> bool:
        return self._call(lambda: self._motor.moving)

    @property
    def velocity(self) -> float:
        return self._call(lambda: self._motor.velocity)

    def move(self, target: float, wait: bool = True, timeout: float | None = None) -> None:
        self._call(self._motor.move, target, wait=wait, timeout=timeout)

    def stop(self) -> None:
        self._call(self._motor.stop)


def beamline_actuators(config: Config, settle_s: float = 5.0) -> LazyActuators:
    """The beamline's motors by role (``[epics] beamline_prefix`` + ``[motors]``), connected on
    first use as :class:`hw.actuators.EpicsMotor` (wrapped in :class:`CaMotor`)."""
    from feedback.executor import LazyActuators
    from hw.actuators import EpicsMotor

    records = pvnames.motor_pvs(config.epics.beamline_prefix, config.motors)

    def connect(role: str) -> CaMotor:
        return CaMotor(EpicsMotor(records[role], name=role, settle_s=settle_s))

    return LazyActuators(connect, records)


class LazyFrameType:
    """The camera's ``CAM:FrameType`` under the beamline prefix, connected on first use."""

    def __init__(self, pv_name: str) -> None:
        self.pv_name = pv_name
        self._camera: EpicsFrameType | None = None

    def _connected(self) -> EpicsFrameType:
        from feedback.executor import EpicsFrameType

        if self._camera is None:
            self._camera = EpicsFrameType(self.pv_name)
        return self._camera

    @property
    def kind(self) -> str:
        return self._connected().kind

    def set_kind(self, kind: str) -> None:
        self._connected().set_kind(kind)


def _camera(config: Config) -> LazyFrameType:
    return LazyFrameType(pvnames.pv(config.epics.beamline_prefix, pvnames.CAM_FRAME_TYPE))


def _executor(config: Config, settings: FeedbackSettings, buffer: ResultBuffer,
              dry_run: bool) -> Executor:
    from feedback.executor import Executor

    return Executor(beamline_actuators(config, settings.move_settle_s), buffer,
                    camera=_camera(config), dry_run=dry_run,
                    acquire_timeout_s=settings.acquire_timeout_s,
                    stale_after_s=settings.stale_after_s,
                    move_settle_s=settings.move_settle_s)


def start_runtime(config: Config, pv_server: Any, publisher: Any,
                  state: Any = None) -> FeedbackRuntime:
    """The feedback runtime of ``txmlive run``: Results from ``publisher``, operator commands
    through ``pv_server``, loop states to ``state`` (default the PV server; anything with
    ``set_state(**values)``); started. Stop it with ``stop()`` before the PV server."""
    from feedback.results import ResultBuffer
    from feedback.runtime import FeedbackRuntime

    settings = feedback_settings(config)
    configure_ca(config)
    executor = _executor(config, settings, ResultBuffer(), settings.dry_run)
    runtime = FeedbackRuntime(executor, settings.loop, commands=pv_server.commands,
                              state=pv_server if state is None else state)
    publisher.add_listener(runtime.on_result)
    runtime.start()
    return runtime


# -- the commands ---------------------------------------------------------------------------

class StepFailed(Exception):
    """A step before the procedure could run failed; the message names it."""

    def __init__(self, step: str, cause: BaseException) -> None:
        super().__init__(f"{step} failed: {cause}")
        self.step = step


@contextmanager
def _step(name: str) -> Iterator[None]:
    try:
        yield
    except (ConnectionError, TimeoutError, OSError, RuntimeError, TypeError, ValueError) as exc:
        raise StepFailed(name, exc) from exc


def _run(args: argparse.Namespace, config: Config, name: str, roles: tuple[str, ...],
         build: Callable[[Any, FeedbackSettings, Executor], Procedure],
         summary: Callable[[dict[str, Any]], str], rollback: bool = True) -> int:
    from feedback.commands import Verdict
    from feedback.executor import build_guard
    from feedback.results import ResultBuffer, ResultsSubscriber

    prog = f"txmlive {args.command}"
    settings = feedback_settings(config)
    url = args.results or config.endpoints.results
    subscriber = None
    try:
        with _step("configuring Channel Access"):
            configure_ca(config)
        buffer = ResultBuffer()
        with _step(f"subscribing to the results stream {url}"):
            subscriber = ResultsSubscriber(url, buffer)
            subscriber.start()
        executor = _executor(config, settings, buffer,
                             settings.dry_run or args.dry_run)
        records = pvnames.motor_pvs(config.epics.beamline_prefix, config.motors)
        where = ", ".join(f"{role} = {records.get(role, '?')}" for role in roles)
        with _step(f"connecting to the motors ({where})"):
            guard = build_guard(executor.actuators, roles, settings.loop.roles)
        with _step(f"waiting for results from {url} (is `txmlive run` running?)"):
            if not buffer.wait_first(settings.acquire_timeout_s):
                raise TimeoutError(f"no result within {settings.acquire_timeout_s:g} s")
        with _step(f"preparing the {name}"):
            procedure = build(guard, settings, executor)
        print(f"{prog}: {name} started{' (dry run)' if executor.dry_run else ''}",
              file=sys.stderr, flush=True)

        def interrupt(signum: int, _frame: Any) -> None:
            executor.abort(f"interrupted by {signal.Signals(signum).name}")

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, interrupt)
        report = executor.run(procedure, guard, name=name,
                              **({} if rollback else {"rollback_verdicts": ()}))
    except StepFailed as exc:
        print(f"{prog}: {exc}", file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps({"verdict": str(Verdict.ABORTED), "step": exc.step,
                              "reason": str(exc)}), flush=True)
        return 1
    finally:
        if subscriber is not None:
            subscriber.close()
    return _report(args, prog, report, summary)


def _report(args: argparse.Namespace, prog: str, report: RunReport,
            summary: Callable[[dict[str, Any]], str]) -> int:
    from feedback.commands import Verdict

    out = report.as_dict()
    print(f"{prog}: {report.verdict} ({report.done.reason}); {summary(out)}; "
          f"{report.duration_s:.1f} s", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(out, default=_json_default), flush=True)
    planned = report.dry_run and report.done.reason.startswith("Aborted: dry run:")
    return 1 if report.verdict == Verdict.ABORTED and not planned else 0


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def cmd_autofocus(args: argparse.Namespace, config: Config) -> int:
    """Zone-plate autofocus on the live results."""
    from feedback.autofocus import autofocus

    def build(guard: Any, settings: FeedbackSettings, _executor: Executor) -> Procedure:
        return autofocus(guard, settings.loop.zone_plate, settings.loop.autofocus)

    def summary(out: dict[str, Any]) -> str:
        return (f"best z {_fmt(out.get('best_z_um'))} ± {_fmt(out.get('uncertainty_um'), '.2g')}"
                f" µm from {_fmt(out.get('start_z_um'))} µm, {out.get('frames_used')} frames")

    role = feedback_settings(config).loop.autofocus.role
    return _run(args, config, "autofocus", (role,), build, summary)


def cmd_tune_shaker(args: argparse.Namespace, config: Config) -> int:
    """Shaker frequency (whole periods per exposure) and amplitude (flat-field uniformity)."""
    from feedback.shaker import tune_shaker

    def build(guard: Any, settings: FeedbackSettings, _executor: Executor) -> Procedure:
        return tune_shaker(guard, settings.loop.shaker)

    def summary(out: dict[str, Any]) -> str:
        return (f"{_fmt(out.get('frequency_hz'))} Hz, {_fmt(out.get('amplitude_um'))} µm, "
                f"CV {_fmt(out.get('uniformity_cv'), '.3g')}, {out.get('frames_used')} frames")

    shaker = feedback_settings(config).loop.shaker
    return _run(args, config, "shaker tuning", (shaker.amp_role, shaker.freq_role), build,
                summary)


def scan_energies(start_ev: float, stop_ev: float, step_ev: float) -> list[float]:
    """Energies from ``start_ev`` towards ``stop_ev`` (included when on the grid) by
    ``step_ev`` (> 0), eV."""
    for name, value in (("--start-ev", start_ev), ("--stop-ev", stop_ev),
                        ("--step-ev", step_ev)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive energy in eV, got {value!r}")
    count = math.floor(abs(stop_ev - start_ev) / step_ev + 1e-9) + 1
    if count > MAX_SCAN_STEPS:
        raise ValueError(f"{count} energies: more than {MAX_SCAN_STEPS}; use a larger --step-ev")
    sign = 1.0 if stop_ev >= start_ev else -1.0
    return [round(start_ev + sign * k * step_ev, 6) for k in range(count)]


def cmd_energy_scan(args: argparse.Namespace, config: Config) -> int:
    """Energy scan with the ZP following the focus model, refocusing on a score drop."""
    from feedback.focus_tracking import FocusModel, energy_scan, fit_focus_model
    from txmlive.cli import UsageError

    try:
        energies = scan_energies(args.start_ev, args.stop_ev, args.step_ev)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    tracking = feedback_settings(config).tracking

    def build(guard: Any, settings: FeedbackSettings, executor: Executor) -> Procedure:
        zone_plate = settings.loop.zone_plate
        if len(settings.focus_points) >= 2:
            model = fit_focus_model(settings.focus_points, zone_plate, kind=settings.focus_model)
        else:
            # The nominal lens through where the scan starts; the first energy is refocused.
            energy = executor.actuators[tracking.energy_role].position
            zp_z = executor.actuators[tracking.zp_role].position
            model = FocusModel("thin_lens", zone_plate, 0.0).anchored(energy, zp_z)
        return energy_scan(guard, model, energies, settings.tracking)

    def summary(out: dict[str, Any]) -> str:
        return (f"{len(out.get('steps', []))} energies, refocused at "
                f"{out.get('refocus_events')} eV, {out.get('frames_used')} frames")

    return _run(args, config, "energy scan", (tracking.zp_role, tracking.energy_role), build,
                summary, rollback=False)


def add_commands(subparsers: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``autofocus``, ``tune-shaker`` and ``energy-scan`` with ``txmlive``'s parser.

    ``command(name, func, help)`` makes a subparser with ``--config`` (``txmlive.cli``).
    """
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--results", metavar="URL", help="the pipeline's results endpoint "
                                                        "(SUB connects)")
        p.add_argument("--dry-run", action="store_true",
                       help="compute and log the moves without putting them")
        p.add_argument("--json", action="store_true", help="print one JSON result object")

    common(command("autofocus", cmd_autofocus,
                   "zone-plate autofocus on the live results (verdict, best z, uncertainty)"))
    common(command("tune-shaker", cmd_tune_shaker,
                   "tune the condenser shaker: whole periods per exposure, flat-field "
                   "uniformity"))
    p = command("energy-scan", cmd_energy_scan,
                "energy scan with the zone plate kept in focus")
    p.add_argument("--start-ev", type=float, required=True, help="first energy, eV")
    p.add_argument("--stop-ev", type=float, required=True, help="last energy, eV")
    p.add_argument("--step-ev", type=float, required=True, help="energy step, eV (> 0)")
    common(p)
