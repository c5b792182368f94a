"""The executor: the one place where feedback moves reach the hardware.

Procedures (:mod:`feedback.commands`) and the continuous beam loop only *ask*; the
:class:`Executor` carries out their commands on one thread, through the hardware adapters
(:class:`hw.actuators.Actuator`: pyepics motor records on a beamline, fakes in tests):

- :class:`~feedback.commands.Move`: read the position, check the move with
  :class:`feedback.safety.Guard` (a refusal is logged and thrown into the procedure; nothing
  is put), put the target, wait for motion done (``.DMOV`` back to 1 and the readback at the
  target within the role's tolerance — never a fixed sleep), answer a
  :class:`~feedback.commands.MoveDone` stamped with the wall-clock time motion was seen done.
  In dry-run nothing is put: the move is logged and answered as done at the target.
- :class:`~feedback.commands.Read`: the readback.
- :class:`~feedback.commands.Acquire`: new Results from the :class:`~feedback.results.
  ResultBuffer` under the stale-frame rule (:class:`feedback.safety.FreshFilter` against the
  run's latest move of each role). For flat frames the camera's frame type is switched to
  flat for the acquisition and back afterwards.
- :class:`~feedback.commands.Log` and :class:`~feedback.commands.Done`: logged.

Every action — each put with the metric values that justified it and the position to roll
back to, each refusal, stop, acquisition and log line — becomes an :class:`Action` in
:attr:`Executor.actions` and on the ``feedback.executor`` logger.

Abort (:meth:`Executor.abort`, from any thread: an operator, a signal, a disabled loop) sets a
flag; the executor thread, which polls a move in flight every few ms, stops every moving
actuator itself (all puts stay on one thread) and throws :class:`~feedback.commands.Aborted`
into the procedure, which ends ``aborted`` and puts nothing more. A failure (IOC disconnect,
a move that does not finish, a stale stream) is thrown in the same way. After a procedure that
ended ``railed``, ``flat`` or ``ambiguous`` the executor checks that every role it moved is
back at its rollback position and moves it there if not; after ``aborted`` it puts nothing.

Dry-run answers the procedures as if moves had happened, but no frame can show a position the
motors never reached, so a procedure's first acquisition after a dry-run move ends it
(``aborted``, saying so): what a dry run shows is the plan up to the first measurement that
depends on a move. Continuous loops keep running in dry-run (their moves are logged from the
real positions; see :mod:`feedback.runtime`).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from feedback.commands import (
    Aborted,
    Acquire,
    Command,
    Done,
    Log,
    Move,
    MoveDone,
    Procedure,
    Read,
    Verdict,
    drive,
)
from feedback.results import ResultBuffer, result_summary
from feedback.safety import FreshFilter, Guard, MoveRefused, RoleLimits
from hw.actuators import Actuator, LimitError, MoveError

log = logging.getLogger(__name__)

ACTION_KINDS = ("move", "failed", "dry-run", "refused", "rollback", "stop", "camera", "acquire",
                "log", "done", "error")
"""Kinds of :class:`Action`. ``move``, ``failed`` (a put whose move did not complete),
``rollback`` and ``stop`` are puts to a motor; ``camera`` a put to the camera."""

PUT_KINDS = ("move", "failed", "rollback", "stop")
"""Action kinds that are puts to a motor."""

DEFAULT_ROLLBACK_VERDICTS = frozenset({Verdict.RAILED, Verdict.FLAT, Verdict.AMBIGUOUS})
"""Verdicts after which the executor returns moved roles to their rollback positions."""

AREA_DETECTOR_FRAME_TYPES = {"data": "Normal", "dark": "Background", "flat": "FlatField"}
"""Frame kind → areaDetector ``FrameType`` choice."""


@dataclass(frozen=True)
class Action:
    """One logged action.

    Attributes
    ----------
    t_ns : int
        Wall-clock time, ns since the epoch (for a put: when it was put).
    run : str
        The procedure or loop it belongs to (``autofocus``, ``beam`` ...).
    kind : str
        One of :data:`ACTION_KINDS`.
    message : str
        What happened, in words.
    role : str or None
    target : float or None
        Commanded target.
    position : float or None
        Readback before the move (the position it came from).
    rollback : float or None
        Where to return the role if the result is rejected.
    metrics : mapping
        The metric values that justified a move.
    data : mapping
        Anything else (completion time and readback, frames, verdict ...).
    """

    t_ns: int
    run: str
    kind: str
    message: str
    role: str | None = None
    target: float | None = None
    position: float | None = None
    rollback: float | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        out = asdict(self)
        out["metrics"], out["data"] = dict(self.metrics), dict(self.data)
        return out

    def line(self) -> str:
        """One human line for a progress display."""
        return f"[{self.run}] {self.kind}: {self.message}"


class FrameTypeControl(Protocol):
    """The camera's frame type (areaDetector ``FrameType``), as frame kinds."""

    @property
    def kind(self) -> str:
        """The kind of the frames the camera takes now: ``data``, ``dark`` or ``flat``."""
        ...

    def set_kind(self, kind: str) -> None:
        """Make the camera take frames of ``kind``."""
        ...


def call_ca(name: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)`` with pyepics' own exceptions (a get on a channel that has just
    disconnected raises ``ChannelAccessGetFailure``) turned into the ``ConnectionError`` the
    procedures treat as an IOC disconnect."""
    import epics.ca

    try:
        return func(*args, **kwargs)
    except (epics.ca.ChannelAccessException, epics.ca.ChannelAccessGetFailure,
            epics.ca.CASeverityException) as exc:
        raise ConnectionError(f"{name}: {type(exc).__name__}: {exc}") from exc


class EpicsFrameType:
    """An areaDetector ``FrameType`` record (``Normal`` / ``Background`` / ``FlatField``).

    Parameters
    ----------
    pv_name : str
        Full PV name, e.g. ``TXMSIM:CAM:FrameType`` (from :data:`hw.pvnames.CAM_FRAME_TYPE`).
    timeout_s : float
        Connection and put-completion timeout, s.
    """

    def __init__(self, pv_name: str, timeout_s: float = 5.0) -> None:
        import epics

        self.pv_name = pv_name
        self.timeout_s = timeout_s
        self._pv = epics.get_pv(pv_name, connect=True, timeout=timeout_s)
        if not self._pv.connected:
            raise ConnectionError(f"camera frame type {pv_name} did not connect within "
                                  f"{timeout_s:g} s")

    def _ca(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return call_ca(self.pv_name, func, *args, **kwargs)

    @property
    def kind(self) -> str:
        value = self._ca(self._pv.get, as_string=True, use_monitor=False, timeout=self.timeout_s)
        if value is None:
            raise ConnectionError(f"no value for {self.pv_name} (disconnected?)")
        for kind, name in AREA_DETECTOR_FRAME_TYPES.items():
            if value == name:
                return kind
        raise ConnectionError(f"{self.pv_name} reads {value!r}, not one of "
                              f"{list(AREA_DETECTOR_FRAME_TYPES.values())}")

    def set_kind(self, kind: str) -> None:
        if kind not in AREA_DETECTOR_FRAME_TYPES:
            raise ValueError(f"frame kind must be one of {list(AREA_DETECTOR_FRAME_TYPES)}, "
                             f"got {kind!r}")
        status = self._ca(self._pv.put, AREA_DETECTOR_FRAME_TYPES[kind], wait=True,
                          timeout=self.timeout_s)
        if status != 1:
            raise ConnectionError(f"put of {AREA_DETECTOR_FRAME_TYPES[kind]} to {self.pv_name} "
                                  f"did not complete within {self.timeout_s:g} s")


class LazyActuators(Mapping[str, Actuator]):
    """Role → actuator, each connected on first use.

    Parameters
    ----------
    factory : callable
        ``factory(role) -> Actuator`` (e.g. an :class:`hw.actuators.EpicsMotor` of the role's
        record); a failure to connect raises ``ConnectionError`` and is retried next time.
    roles : iterable of str
        The roles there are (the config's role map).
    """

    def __init__(self, factory: Callable[[str], Actuator], roles: Iterable[str]) -> None:
        self._factory = factory
        self._roles = tuple(roles)
        self._connected: dict[str, Actuator] = {}
        self._lock = threading.Lock()

    def __getitem__(self, role: str) -> Actuator:
        with self._lock:
            if role in self._connected:
                return self._connected[role]
        if role not in self._roles:
            raise KeyError(role)
        try:
            actuator = self._factory(role)
        except TypeError as exc:  # e.g. the record exists but is no motor record
            raise ConnectionError(f"{role}: {exc}") from exc
        with self._lock:
            return self._connected.setdefault(role, actuator)

    def __iter__(self) -> Iterator[str]:
        return iter(self._roles)

    def __len__(self) -> int:
        return len(self._roles)

    def connected(self) -> dict[str, Actuator]:
        """The actuators connected so far."""
        with self._lock:
            return dict(self._connected)


@dataclass(frozen=True)
class RoleSettings:
    """Per-role settings of the guard (``[feedback]`` in the config).

    Attributes
    ----------
    max_step : mapping of str to float
        Largest step of one move, per role (a role without one cannot be moved).
    tolerance : mapping of str to float
        Readback tolerance per role (0 when not listed).
    soft_limits : mapping of str to (float, float)
        Limits narrower than the motor record's own (``.LLM``/``.HLM``), per role.
    """

    max_step: Mapping[str, float]
    tolerance: Mapping[str, float] = field(default_factory=dict)
    soft_limits: Mapping[str, tuple[float, float]] = field(default_factory=dict)


def role_limits(role: str, record_limits: tuple[float, float], settings: RoleSettings
                ) -> RoleLimits:
    """The guard's limits of ``role``: the record's limits narrowed by the configured ones.

    Raises
    ------
    ValueError
        No maximum step for the role, no usable limits (a record without soft limits,
        ``.HLM == .LLM``, and none configured), or configured limits outside the record's.
    """
    if role not in settings.max_step:
        raise ValueError(f"{role}: no maximum step configured ([feedback] max_step)")
    low, high = (float(v) for v in record_limits)
    has_record = math.isfinite(low) and math.isfinite(high) and low < high
    if role in settings.soft_limits:
        c_low, c_high = (float(v) for v in settings.soft_limits[role])
        if has_record and (c_low < low or c_high > high):
            raise ValueError(f"{role}: configured soft limits [{c_low:g}, {c_high:g}] reach "
                             f"beyond the motor's own [{low:g}, {high:g}]")
        low, high = c_low, c_high
    elif not has_record:
        raise ValueError(f"{role}: the motor has no soft limits ({low:g}, {high:g}) and "
                         "[feedback] soft_limits lists none")
    return RoleLimits(low, high, float(settings.max_step[role]),
                      float(settings.tolerance.get(role, 0.0)))


def build_guard(actuators: Mapping[str, Actuator], roles: Iterable[str],
                settings: RoleSettings) -> Guard:
    """A :class:`Guard` for ``roles`` from the actuators' limits and the settings.

    Connects each role's actuator (``ConnectionError`` if one cannot be reached).
    """
    limits = {}
    for role in roles:
        try:
            actuator = actuators[role]
        except KeyError:
            raise ConnectionError(f"no motor configured for role {role!r}") from None
        limits[role] = role_limits(role, actuator.limits, settings)
    return Guard(limits)


@dataclass
class RunReport:
    """How one procedure ran.

    Attributes
    ----------
    name : str
    done : Done
        The procedure's last command (verdict, reason, result).
    duration_s : float
    actions : list of Action
        Everything the executor did for it, in order.
    rolled_back : dict of str to float
        Roles the executor returned to their rollback position afterwards.
    dry_run : bool
    """

    name: str
    done: Done
    duration_s: float
    actions: list[Action]
    rolled_back: dict[str, float]
    dry_run: bool

    @property
    def verdict(self) -> Verdict:
        return self.done.verdict

    def as_dict(self, with_actions: bool = True) -> dict[str, Any]:
        """The procedure's result plus ``verdict``, ``reason``, ``duration_s``, ``dry_run``,
        ``rolled_back`` and (optionally) ``actions``; JSON-able."""
        out = dict(self.done.result)
        out.update(verdict=str(self.done.verdict), reason=self.done.reason,
                   duration_s=self.duration_s, dry_run=self.dry_run,
                   rolled_back=dict(self.rolled_back))
        if with_actions:
            out["actions"] = [a.as_dict() for a in self.actions]
        return out


class Executor:
    """Carries out procedures' commands and single moves against the hardware.

    Parameters
    ----------
    actuators : mapping of str to Actuator
        Role → actuator (:class:`LazyActuators` connects on first use).
    results : ResultBuffer
        Where Results arrive.
    camera : FrameTypeControl, optional
        Needed to acquire flat frames.
    dry_run : bool
        Log moves without putting them.
    acquire_timeout_s : float
        Default longest wait of an acquisition.
    stale_after_s : float
        A results stream silent this long is stale (the acquisition fails).
    move_settle_s : float
        Time allowed for a move beyond distance / ``.VELO``.
    move_timeout_s : float
        Time allowed for a move of an actuator that reports no velocity.
    poll_s : float
        Period at which a move in flight is checked (done, abort).
    log_capacity : int
        Actions kept in :attr:`actions`.
    on_action : callable, optional
        Called with every :class:`Action` (progress display, state PVs).
    clock_ns : callable
        Wall clock, ns since the epoch.

    Notes
    -----
    :meth:`run`, :meth:`apply` and :meth:`stop_motion` must be called from one thread, the
    executor thread; :meth:`abort` from any.
    """

    def __init__(self, actuators: Mapping[str, Actuator], results: ResultBuffer, *,
                 camera: FrameTypeControl | None = None, dry_run: bool = False,
                 acquire_timeout_s: float = 10.0, stale_after_s: float = 2.0,
                 move_settle_s: float = 5.0, move_timeout_s: float = 60.0,
                 poll_s: float = 0.005, log_capacity: int = 10000,
                 on_action: Callable[[Action], None] | None = None,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        for name, value in (("acquire_timeout_s", acquire_timeout_s),
                            ("stale_after_s", stale_after_s), ("move_settle_s", move_settle_s),
                            ("move_timeout_s", move_timeout_s), ("poll_s", poll_s)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"Executor: {name} must be > 0, got {value!r}")
        self.actuators = actuators
        self.results = results
        self.camera = camera
        self.dry_run = bool(dry_run)
        self.acquire_timeout_s = float(acquire_timeout_s)
        self.stale_after_s = float(stale_after_s)
        self.move_settle_s = float(move_settle_s)
        self.move_timeout_s = float(move_timeout_s)
        self.poll_s = float(poll_s)
        self.on_action = on_action
        self._clock_ns = clock_ns
        self.actions: collections.deque[Action] = collections.deque(maxlen=log_capacity)
        self._lock = threading.Lock()
        self._abort = threading.Event()
        self._abort_reason = ""
        self._run: str | None = None
        self._run_actions: list[Action] = []
        self._done: dict[str, MoveDone] = {}
        self._rollback: dict[str, float] = {}
        self._dry_moved = False
        self._camera_for_data = True

    # -- any thread ----------------------------------------------------------------------

    @property
    def running(self) -> str | None:
        """Name of the procedure running now, or None."""
        with self._lock:
            return self._run

    def abort(self, reason: str = "operator abort") -> bool:
        """Abort the running procedure (any thread): motion stops, it ends ``aborted``.

        Returns
        -------
        bool
            Whether a procedure was running.
        """
        with self._lock:
            if self._run is None:
                return False
            if not self._abort.is_set():
                self._abort_reason = reason
                self._abort.set()
            return True

    # -- logging -------------------------------------------------------------------------

    def _record(self, run: str, kind: str, message: str, *, t_ns: int | None = None,
                **fields: Any) -> Action:
        action = Action(self._clock_ns() if t_ns is None else t_ns, run, kind, message,
                        **fields)
        self.actions.append(action)
        if self._run is not None and run == self._run:
            self._run_actions.append(action)
        level = logging.WARNING if kind in ("refused", "failed", "stop", "error") \
            else logging.INFO
        log.log(level, "%s", action.line())
        if self.on_action is not None:
            try:
                self.on_action(action)
            except Exception:  # a display problem must not stop the executor
                log.exception("on_action callback failed")
        return action

    # -- hardware ------------------------------------------------------------------------

    def _actuator(self, role: str) -> Actuator:
        try:
            return self.actuators[role]
        except KeyError:
            raise ConnectionError(f"no motor configured for role {role!r}") from None

    def _move_timeout(self, actuator: Actuator, distance: float) -> float:
        velocity = getattr(actuator, "velocity", None)
        if isinstance(velocity, int | float) and velocity > 0 and math.isfinite(velocity):
            return distance / velocity + self.move_settle_s
        return self.move_timeout_s

    def _wait_done(self, actuator: Actuator, move: Move, tolerance: float,
                   timeout_s: float, abortable: bool) -> float:
        """Poll until motion is done at the target; the readback then."""
        deadline = time.monotonic() + timeout_s
        while True:
            if abortable and self._abort.is_set():
                raise Aborted(self._abort_reason)
            moving = actuator.moving
            position = actuator.position
            if not moving and abs(position - move.target) <= tolerance:
                return position
            if time.monotonic() > deadline:
                raise TimeoutError(f"{move.role}: move to {move.target:g} not done within "
                                   f"{timeout_s:.3g} s (at {position:g}, "
                                   f"{'moving' if moving else 'stopped'})")
            if abortable:
                self._abort.wait(self.poll_s)
            else:
                time.sleep(self.poll_s)

    def stop_motion(self, run: str, primary: Actuator | None = None) -> None:
        """Stop ``primary`` and every other connected actuator that is moving (best effort)."""
        connected = (self.actuators.connected() if isinstance(self.actuators, LazyActuators)
                     else dict(self.actuators))
        for role, actuator in connected.items():
            try:
                if actuator is not primary and not actuator.moving:
                    continue
                actuator.stop()
                self._record(run, "stop", f"{role} stopped at {actuator.position:g}",
                             role=role)
            except Exception as exc:  # an IOC that is gone cannot be stopped; say so
                self._record(run, "error", f"{role}: stop failed: {exc}", role=role)

    def _put(self, move: Move, guard: Guard, run: str, kind: str, abortable: bool) -> MoveDone:
        """Check, put and wait for one move; logs it as ``kind`` (``move`` or ``rollback``)."""
        actuator = self._actuator(move.role)
        current = actuator.position
        common = dict(role=move.role, target=move.target, position=current,
                      rollback=move.rollback, metrics=dict(move.metrics))
        try:
            guard.check(move, current)
        except MoveRefused as exc:
            self._record(run, "refused", f"{move.role} → {move.target!r}: {exc.why}", **common)
            raise
        if self.dry_run:
            self._dry_moved = True
            self._record(run, "dry-run", f"{move.role} {current:g} → {move.target:g} not put "
                                         f"({move.reason})", **common)
            return MoveDone(move.role, move.target, move.target, self._clock_ns())
        if abortable and self._abort.is_set():
            raise Aborted(self._abort_reason)
        tolerance = guard.limits(move.role).tolerance
        timeout_s = self._move_timeout(actuator, abs(move.target - current))
        t_put = self._clock_ns()
        t0 = time.monotonic()
        try:
            actuator.move(move.target, wait=False)
            position = self._wait_done(actuator, move, tolerance, timeout_s, abortable)
        except Aborted as exc:
            self._record(run, "failed", f"{move.role} → {move.target:g} aborted: {exc}",
                         t_ns=t_put, **common)
            self.stop_motion(run, actuator)
            raise
        except TimeoutError as exc:
            self._record(run, "failed", str(exc), t_ns=t_put, **common)
            self.stop_motion(run, actuator)
            raise
        except (ConnectionError, LimitError, MoveError) as exc:
            self._record(run, "failed", f"{move.role} → {move.target:g}: {exc}", t_ns=t_put,
                         **common)
            raise
        t_done = self._clock_ns()
        self._record(run, kind, f"{move.role} {current:g} → {move.target:g} ({move.reason}), "
                                f"done at {position:g} in {time.monotonic() - t0:.3g} s",
                     t_ns=t_put, data={"t_done_ns": t_done, "readback": position}, **common)
        return MoveDone(move.role, move.target, position, t_done)

    def apply(self, move: Move, guard: Guard, run: str = "beam") -> MoveDone:
        """Carry out one move outside a procedure (a continuous loop's correction).

        Checked, put and awaited as in a procedure; not abortable by :meth:`abort`.
        Raises what the move raises (``MoveRefused``, ``ConnectionError``, ``TimeoutError``,
        actuator errors).
        """
        return self._put(move, guard, run, "move", abortable=False)

    # -- procedures ----------------------------------------------------------------------

    @contextmanager
    def _frame_kind(self, kind: str, run: str) -> Iterator[None]:
        """The camera taking ``kind`` frames for the duration (then what it took before).

        Flat frames need the camera; for data frames it is best effort (a camera whose frame
        type cannot be read is left as it is, and not asked again for data frames).
        """
        camera = self.camera if kind != "data" or self._camera_for_data else None
        if camera is None:
            if kind != "data":
                raise ConnectionError(f"no camera frame-type control to take {kind} frames")
            yield
            return
        try:
            before = camera.kind
            if before != kind:
                camera.set_kind(kind)
        except ConnectionError as exc:
            if kind != "data":
                raise
            self._camera_for_data = False
            self._record(run, "error", f"camera frame type unavailable ({exc}); acquiring "
                                       "data frames without it")
            yield
            return
        if before == kind:
            yield
            return
        self._record(run, "camera", f"frame type {before} → {kind}")
        try:
            yield
        finally:
            camera.set_kind(before)
            self._record(run, "camera", f"frame type {kind} → {before}")

    def _acquire(self, command: Acquire, guard: Guard, run: str) -> list[dict[str, Any]]:
        if self.dry_run and command.after_move and self._dry_moved:
            raise Aborted("dry run: the motors did not move, so no frame at the planned "
                          "position exists; the plan so far is in the log")
        if self.dry_run and command.kind != "data":
            raise Aborted(f"dry run: taking {command.kind} frames would switch the camera's "
                          "frame type")
        moves = list(self._done.values()) if command.after_move else []
        fresh = FreshFilter(moves, guard.tolerances, command.keys)
        not_before = None if command.after_move else self._clock_ns()
        timeout_s = command.timeout_s or self.acquire_timeout_s
        with self._frame_kind(command.kind, run):
            try:
                results = self.results.acquire(
                    command.n_frames, kind=command.kind, fresh=fresh, keys=command.keys,
                    not_before_ns=not_before, timeout_s=timeout_s,
                    stale_after_s=self.stale_after_s, abort=self._abort)
            except InterruptedError:
                raise Aborted(self._abort_reason) from None
        frames = [result_summary(r, command.keys) for r in results]
        self._record(run, "acquire", f"{len(results)} {command.kind} frame(s), seq "
                                     f"{[f['seq'] for f in frames]}", data={"frames": frames})
        return results

    def _handle(self, command: Command, guard: Guard, run: str) -> Any:
        if isinstance(command, Move):
            if command.rollback is not None:
                self._rollback.setdefault(command.role, command.rollback)
            done = self._put(command, guard, run, "move", abortable=True)
            self._done[command.role] = done
            return done
        if isinstance(command, Read):
            if self._abort.is_set():
                raise Aborted(self._abort_reason)
            return self._actuator(command.role).position
        if isinstance(command, Acquire):
            return self._acquire(command, guard, run)
        if isinstance(command, Log):
            self._record(run, "log", command.message, data=dict(command.data))
            return None
        if isinstance(command, Done):
            self._record(run, "done", f"{command.verdict}: {command.reason}",
                         data={"verdict": str(command.verdict)})
            return None
        raise TypeError(f"unknown command {command!r}")

    def _roll_back(self, guard: Guard, run: str, verdict: Verdict) -> dict[str, float]:
        """Return every moved role to its rollback position (step by step, guarded)."""
        rolled: dict[str, float] = {}
        for role, target in self._rollback.items():
            actuator = self._actuator(role)
            here = actuator.position
            if abs(here - target) <= guard.limits(role).tolerance:
                continue
            for waypoint in guard.waypoints(role, here, target):
                self._put(Move(role, waypoint, f"rollback after verdict {verdict}", {}, target),
                          guard, run, "rollback", abortable=False)
            rolled[role] = target
        return rolled

    def run(self, procedure: Procedure, guard: Guard, *, name: str,
            rollback_verdicts: Iterable[Verdict] = DEFAULT_ROLLBACK_VERDICTS) -> RunReport:
        """Run a procedure to its end (on this thread).

        Parameters
        ----------
        procedure : generator
            A fresh procedure (:mod:`feedback.commands`).
        guard : Guard
            Limits every move is checked against (the same the procedure planned with).
        name : str
            For the log (``autofocus``, ``shaker``, ``energy-scan``, ``beam-calibration``).
        rollback_verdicts : iterable of Verdict
            Verdicts after which moved roles go back to their rollback positions (never after
            ``aborted``: then nothing more is put).

        Returns
        -------
        RunReport
            A procedure that fails with an unexpected error ends ``aborted`` (logged).
        """
        rollback_verdicts = frozenset(rollback_verdicts) - {Verdict.ABORTED}
        with self._lock:
            if self._run is not None:
                raise RuntimeError(f"{name}: the executor is busy with {self._run}")
            self._run = name
            self._abort.clear()
            self._abort_reason = ""
        self._run_actions = []
        self._done, self._rollback, self._dry_moved = {}, {}, False
        t0 = time.monotonic()
        rolled: dict[str, float] = {}
        try:
            try:
                done = drive(procedure, lambda command: self._handle(command, guard, name))
            except Exception as exc:  # a procedure's bug: stop, report, never crash the caller
                log.exception("%s failed", name)
                self._record(name, "error", f"{type(exc).__name__}: {exc}")
                self.stop_motion(name)
                done = Done(Verdict.ABORTED, f"internal error: {type(exc).__name__}: {exc}",
                            {"verdict": str(Verdict.ABORTED)})
            if done.verdict in rollback_verdicts:
                try:
                    rolled = self._roll_back(guard, name, done.verdict)
                except Exception as exc:  # report it with the verdict; the operator acts
                    self._record(name, "error", f"rollback failed: {exc}")
            actions = list(self._run_actions)
        finally:
            with self._lock:
                self._run = None
                self._abort.clear()
        return RunReport(name, done, time.monotonic() - t0, actions, rolled, self.dry_run)
