"""Feedback safety: soft limits and step limits, the stale-frame rule, pause reasons.

The rules of DESIGN.md "Feedback safety", as pure code shared by the controllers (which plan
within them) and the executor (which checks every put against them):

- :class:`Guard` holds, per role, soft limits, the largest step one move may make and the
  readback tolerance. :meth:`Guard.check` validates a :class:`~feedback.commands.Move` before
  its put; a target outside the limits, a step above the maximum, a non-finite target or an
  unknown role is refused with :class:`MoveRefused` and a logged reason — never clipped.
- The stale-frame rule (:func:`frame_problem`, :class:`FreshFilter`): a Result is usable only
  if its frame was acquired (``t_ns``, exposure start) strictly after the last move finished,
  no feedback motor was moving during it, and its ``positions[role]`` lies within tolerance of
  the commanded target; metrics computed on a side thread must describe such a frame
  (``metrics_seq``).
- Pause reasons (:class:`PauseReason`) and the intensity rule (:class:`IntensityRule`) for
  low intensity and beam loss; :func:`stream_is_stale` for a stream that stopped.
- :class:`Motion` is the plan stub procedures move with: it reads a role before its first
  move, splits a long move into steps of at most the role's maximum, and keeps the latest
  :class:`~feedback.commands.MoveDone` per role for the stale-frame rule.
"""

from __future__ import annotations

import enum
import logging
import math
import numbers
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from feedback.commands import Aborted, Command, Move, MoveDone, Read, Result
from hw.actuators import LimitError, MoveError
from stream.metrics import EXPENSIVE_KEYS

log = logging.getLogger(__name__)


class MoveRefused(ValueError):
    """A move the guard refused before any put; nothing moved.

    Attributes
    ----------
    role : str
    target : float
    why : str
        The reason, also in the message.
    """

    def __init__(self, role: str, target: Any, why: str) -> None:
        super().__init__(f"{role}: move to {target!r} refused: {why}")
        self.role, self.target, self.why = role, target, why


STOP_ERRORS: tuple[type[BaseException], ...] = (Aborted, MoveRefused, LimitError, MoveError,
                                                TimeoutError, ConnectionError)
"""Errors an executor throws into a procedure that end it with verdict ``aborted``."""

_STEP_SLACK = 1e-9
"""Relative slack on the step check, so a planned step of exactly the maximum passes."""


def finite_or_none(value: Any) -> float | None:
    """``value`` as a finite float if it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _finite(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


@dataclass(frozen=True)
class RoleLimits:
    """What the guard allows one role.

    Attributes
    ----------
    low, high : float
        Soft limits, in the role's unit.
    max_step : float
        Largest distance one move may cover, in the role's unit.
    tolerance : float
        Largest readback distance from the commanded target at which a frame still counts as
        taken at the target.
    """

    low: float
    high: float
    max_step: float
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        low = _finite("RoleLimits.low", self.low)
        high = _finite("RoleLimits.high", self.high)
        if low >= high:
            raise ValueError(f"RoleLimits: low {low} must be below high {high}")
        if not _finite("RoleLimits.max_step", self.max_step) > 0:
            raise ValueError(f"RoleLimits.max_step must be > 0, got {self.max_step!r}")
        if _finite("RoleLimits.tolerance", self.tolerance) < 0:
            raise ValueError(f"RoleLimits.tolerance must be >= 0, got {self.tolerance!r}")

    def contains(self, value: float) -> bool:
        """Whether ``value`` is a finite position within the soft limits."""
        return math.isfinite(value) and self.low <= value <= self.high


class Guard:
    """Soft limits and step limits for every role a controller may move.

    Parameters
    ----------
    limits : mapping of str to RoleLimits or mapping
        Role → limits; a plain mapping (``{"low": …, "high": …, "max_step": …,
        "tolerance": …}``, as from a TOML table) is turned into :class:`RoleLimits`.

    Attributes
    ----------
    refusals : list of MoveRefused
        Every refusal, in order (also logged at WARNING).
    """

    def __init__(self, limits: Mapping[str, RoleLimits | Mapping[str, float]]) -> None:
        self._limits: dict[str, RoleLimits] = {}
        for role, value in limits.items():
            if not isinstance(role, str) or not role:
                raise ValueError(f"Guard: role names must be non-empty strings, got {role!r}")
            if isinstance(value, RoleLimits):
                self._limits[role] = value
            elif isinstance(value, Mapping):
                try:
                    self._limits[role] = RoleLimits(**value)
                except TypeError as exc:
                    raise ValueError(f"Guard: limits of {role!r}: {exc}") from None
            else:
                raise TypeError(f"Guard: limits of {role!r} must be RoleLimits or a mapping, "
                                f"got {type(value).__name__}")
        self.refusals: list[MoveRefused] = []

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles with limits (every other role is refused)."""
        return tuple(self._limits)

    def limits(self, role: str) -> RoleLimits:
        """The limits of ``role``; ``KeyError`` naming the known roles if it has none."""
        try:
            return self._limits[role]
        except KeyError:
            raise KeyError(f"no limits configured for role {role!r}; known: "
                           f"{sorted(self._limits)}") from None

    @property
    def tolerances(self) -> dict[str, float]:
        """Role → readback tolerance."""
        return {role: lim.tolerance for role, lim in self._limits.items()}

    def _refuse(self, role: str, target: Any, why: str) -> MoveRefused:
        error = MoveRefused(role, target, why)
        self.refusals.append(error)
        log.warning("%s", error)
        return error

    def check(self, move: Move, current: float) -> float:
        """Validate a move before its put.

        Parameters
        ----------
        move : Move
        current : float
            The role's readback position now.

        Returns
        -------
        float
            The target, unchanged.

        Raises
        ------
        MoveRefused
            Unknown role, non-finite target or position, target outside the soft limits, or
            a step above the maximum; the reason is logged.
        """
        role, target = move.role, move.target
        if role not in self._limits:
            raise self._refuse(role, target, f"no limits configured for this role (known: "
                                             f"{sorted(self._limits)})")
        lim = self._limits[role]
        value = finite_or_none(target)
        if value is None:
            raise self._refuse(role, target, "target is not a finite number")
        if not lim.contains(value):
            raise self._refuse(role, target, f"outside the soft limits [{lim.low:g}, "
                                             f"{lim.high:g}]")
        here = finite_or_none(current)
        if here is None:
            raise self._refuse(role, target, f"current position {current!r} is unknown")
        step = abs(value - here)
        if step > lim.max_step * (1.0 + _STEP_SLACK):
            raise self._refuse(role, target, f"step {step:g} from {here:g} exceeds the "
                                             f"maximum step {lim.max_step:g}")
        return value

    def waypoints(self, role: str, current: float, target: float) -> list[float]:
        """Targets from ``current`` to ``target`` in equal steps of at most the maximum step.

        Returns
        -------
        list of float
            Empty when ``target == current``; ends at ``target``.

        Raises
        ------
        MoveRefused
            For a target :meth:`check` would refuse whatever the step (unknown role,
            non-finite, outside the limits) or a non-finite ``current``.
        """
        if role not in self._limits:
            raise self._refuse(role, target, "no limits configured for this role")
        lim = self._limits[role]
        value, here = finite_or_none(target), finite_or_none(current)
        if value is None or not lim.contains(value):
            raise self._refuse(role, target, f"not a finite target within the soft limits "
                                             f"[{lim.low:g}, {lim.high:g}]")
        if here is None:
            raise self._refuse(role, target, f"current position {current!r} is unknown")
        distance = value - here
        if distance == 0.0:
            return []
        n = max(1, math.ceil(abs(distance) / lim.max_step - _STEP_SLACK))
        return [here + distance * k / n for k in range(1, n)] + [value]


def frame_problem(result: Result, moves: Iterable[MoveDone],
                  tolerances: Mapping[str, float]) -> str | None:
    """Why a Result may not be used after ``moves``, or None if it may.

    Parameters
    ----------
    result : mapping
        A Result (``t_ns``, ``moving``, ``positions`` are read).
    moves : iterable of MoveDone
        The latest completed move of each role the procedure moved.
    tolerances : mapping of str to float
        Role → readback tolerance (0 for a role not listed).

    Returns
    -------
    str or None
        The first rule the frame breaks, in words.
    """
    t_ns = result.get("t_ns")
    if isinstance(t_ns, bool) or not isinstance(t_ns, int):
        return f"frame has no acquisition time (t_ns={t_ns!r})"
    if result.get("moving"):
        return "frame was taken while a feedback motor was moving"
    positions = result.get("positions") or {}
    for done in moves:
        if t_ns <= done.t_done_ns:
            return (f"frame acquired at {t_ns} ns, not after the move of {done.role} finished "
                    f"at {done.t_done_ns} ns")
        position = finite_or_none(positions.get(done.role))
        if position is None:
            return f"frame has no position for {done.role}"
        tolerance = tolerances.get(done.role, 0.0)
        if abs(position - done.target) > tolerance:
            return (f"frame position {done.role}={position:g} is more than {tolerance:g} from "
                    f"the commanded {done.target:g}")
    return None


class FreshFilter:
    """The stale-frame rule over a stream of Results in arrival order.

    Parameters
    ----------
    moves : iterable of MoveDone
        Latest completed move per role (empty: only ``moving`` and ``t_ns`` are checked).
    tolerances : mapping of str to float
        Role → readback tolerance.
    keys : iterable of str
        Metric keys that will be used. If any is computed on the side thread
        (:data:`stream.metrics.EXPENSIVE_KEYS`), a Result is accepted only when its
        ``metrics_seq`` is a frame at or after the first fresh one and was not accepted
        before (each expensive value counts once).

    Attributes
    ----------
    reason : str or None
        Why the last refused Result was refused.
    """

    def __init__(self, moves: Iterable[MoveDone], tolerances: Mapping[str, float],
                 keys: Iterable[str] = ()) -> None:
        self._moves = tuple(moves)
        self._tolerances = dict(tolerances)
        self._expensive = any(key in EXPENSIVE_KEYS for key in keys)
        self._first_fresh: int | None = None
        self._used_metrics: set[int] = set()
        self.reason: str | None = None

    def accept(self, result: Result) -> bool:
        """Whether ``result`` is usable; sets :attr:`reason` when it is not."""
        problem = frame_problem(result, self._moves, self._tolerances)
        if problem is None:
            seq = result.get("seq")
            if isinstance(seq, bool) or not isinstance(seq, int):
                problem = f"frame has no sequence number (seq={seq!r})"
            elif self._first_fresh is None:
                self._first_fresh = seq
        if problem is None and self._expensive:
            metrics_seq = result.get("metrics_seq")
            if isinstance(metrics_seq, bool) or not isinstance(metrics_seq, int):
                problem = "frame carries no side-thread metrics yet"
            elif metrics_seq < self._first_fresh:
                problem = (f"side-thread metrics describe frame {metrics_seq}, before the first "
                           f"fresh frame {self._first_fresh}")
            elif metrics_seq in self._used_metrics:
                problem = f"side-thread metrics of frame {metrics_seq} were already used"
            else:
                self._used_metrics.add(metrics_seq)
        self.reason = problem
        return problem is None


class PauseReason(enum.StrEnum):
    """Why a feedback loop is paused."""

    LOW_INTENSITY = "low intensity"
    BEAM_LOSS = "beam loss"
    STALE_STREAM = "stale stream"
    IOC_DISCONNECT = "IOC disconnect"
    ENABLE_OFF = "enable off"


@dataclass(frozen=True)
class IntensityRule:
    """When the frames are too dark to act on.

    Attributes
    ----------
    min_mean_counts : float
        Mean counts at or below which the beam counts as lost whatever the reference
        (for raw frames set it above the dark level).
    beam_loss_fraction : float
        Beam loss below this fraction of the reference mean counts.
    low_fraction : float
        Low intensity below this fraction of the reference mean counts.
    """

    min_mean_counts: float = 0.0
    beam_loss_fraction: float = 0.05
    low_fraction: float = 0.3

    def __post_init__(self) -> None:
        _finite("IntensityRule.min_mean_counts", self.min_mean_counts)
        if not 0 <= self.beam_loss_fraction <= self.low_fraction < 1:
            raise ValueError("IntensityRule: need 0 <= beam_loss_fraction <= low_fraction < 1, "
                             f"got {self.beam_loss_fraction}, {self.low_fraction}")

    def check(self, mean_counts: Any, reference_counts: float | None = None
              ) -> PauseReason | None:
        """The pause reason for a frame of ``mean_counts``, or None if it is bright enough.

        Parameters
        ----------
        mean_counts : float or None
            The frame's ``metrics["mean_counts"]``; missing or non-finite counts as beam loss.
        reference_counts : float or None
            Mean counts of a good frame (at enable or procedure start); None: only the
            absolute floor applies.
        """
        mean_counts = finite_or_none(mean_counts)
        if mean_counts is None or mean_counts <= self.min_mean_counts:
            return PauseReason.BEAM_LOSS
        if reference_counts is not None and reference_counts > 0:
            if mean_counts < self.beam_loss_fraction * reference_counts:
                return PauseReason.BEAM_LOSS
            if mean_counts < self.low_fraction * reference_counts:
                return PauseReason.LOW_INTENSITY
        return None


def stream_is_stale(last_result_ns: int | None, now_ns: int, max_age_s: float) -> bool:
    """Whether no Result arrived for more than ``max_age_s`` (never one counts as stale)."""
    if last_result_ns is None:
        return True
    return (now_ns - last_result_ns) > max_age_s * 1e9


def metric(result: Result, key: str) -> float | None:
    """``result["metrics"][key]`` as a finite float, or None when missing or not finite."""
    return finite_or_none((result.get("metrics") or {}).get(key))


def mean_of(values: Sequence[float]) -> float:
    """Mean of finite metric values (at least one) that cannot overflow, however large."""
    return math.fsum(v / len(values) for v in values)


class Motion:
    """Plan stub for moving roles safely inside a procedure.

    Parameters
    ----------
    guard : Guard
        The same limits the executor checks against.

    Attributes
    ----------
    position : dict of str to float
        Last known readback per role.
    done : dict of str to MoveDone
        Latest completed move per role.
    start : dict of str to float
        Readback of each role before the procedure first moved it (the rollback position).
    """

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.position: dict[str, float] = {}
        self.done: dict[str, MoveDone] = {}
        self.start: dict[str, float] = {}

    def read(self, role: str) -> Generator[Command, Any, float]:
        """Read the role's position (remembered as its start the first time)."""
        value = yield Read(role)
        value = _finite(f"readback of {role}", value)
        self.position[role] = value
        self.start.setdefault(role, value)
        return value

    def move(self, role: str, target: float, reason: str,
             metrics: Mapping[str, Any] | None = None) -> Generator[Command, Any, None]:
        """Move ``role`` to ``target`` in steps of at most its maximum step.

        The target must lie within the soft limits (:class:`MoveRefused` otherwise, before any
        move). Each :class:`~feedback.commands.Move` carries the role's start position as its
        rollback.
        """
        if role not in self.position:
            yield from self.read(role)
        for waypoint in self.guard.waypoints(role, self.position[role], target):
            done = yield Move(role, waypoint, reason, dict(metrics or {}), self.start[role])
            if not isinstance(done, MoveDone) or done.role != role:
                raise MoveError(f"{role}: the executor answered {done!r} to a move")
            self.done[role] = done
            self.position[role] = done.position

    def fresh(self, results: Iterable[Result]) -> tuple[list[Result], list[str]]:
        """Split Results into usable ones and the reasons the others are not.

        The executor already filters (:class:`FreshFilter`); this re-checks the cheap part of
        the rule so that a stale frame handed over by mistake never steers a decision.
        """
        usable, problems = [], []
        tolerances = self.guard.tolerances
        for result in results:
            problem = frame_problem(result, self.done.values(), tolerances)
            if problem is None:
                usable.append(result)
            else:
                problems.append(problem)
        return usable, problems
