"""Beam-position feedback: steer the illumination centroid onto a setpoint with two motors.

Response matrix
---------------
The centroid (px) responds linearly to the steering motors: ``c = d(t) + R·u`` with ``d`` the
drifting, jumping beam and ``R`` (2 × 2, px per motor unit) the response, cross-coupling
included. :func:`calibrate_response` measures it: it moves each motor by ``±δ`` around its
start (``0, +δx, −δx, 0, +δy, −δy, 0``), takes a few frames at each, and fits every centroid
sample with ``c = c₀ + v·t + R·u`` by least squares, so a beam drifting during the calibration
biases nothing (``v`` is fitted too). A jump during the calibration shows as a large residual
and the result is refused; so is a matrix that barely moves the centroid or is ill-conditioned
(condition number above ``max_condition``: its inverse would amplify centroid noise).
``R`` is in px of the calibration's pixel size; at another energy the same motor move shifts
the beam by the same µm, so the controller rescales ``R`` by the pixel-size ratio.

Controller
----------
:class:`BeamFeedback` is a pure, event-driven PI controller in velocity (incremental) form
in motor space. With ``ẽ = R⁻¹(setpoint − centroid)`` in motor units, each update commands

    ``u_next = u_actual + Ki·ẽ_k + Kp·(ẽ_k − ẽ_{k−1})``

from the *actual* motor positions (the frame's readback). That gives, by construction:

- anti-windup: no hidden integrator state exists, so a command held at a drive limit or cut
  to the maximum step accumulates nothing;
- bumpless enable and resume: the first update after enabling (or after a pause) starts from
  where the motors are, with ``ẽ_{k−1} = ẽ_k`` (no proportional kick);
- a deadband (no move while the error is below ``deadband_px``: motors are not dithered on
  centroid noise), the maximum step per move (the whole step is scaled down, keeping its
  direction) and drive limits (soft limits less a margin; while one motor is held at its
  limit the other takes the least-squares best share of the wanted centroid change); both
  are reported as saturation. Steps below a role's readback tolerance are not commanded.

It acts only on fresh frames (:func:`feedback.safety.frame_problem`: acquired after its last
moves finished, not moving, at the commanded positions), one correction in flight at a time,
and pauses with a reason on beam loss or low intensity (:class:`feedback.safety.
IntensityRule` against the intensity when enabled), a stale stream (no Result for
``stale_after_s``), an IOC disconnect or a move that never finished, or the enable switch
off. Setpoints may depend on energy (:class:`SetpointTable`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from feedback.commands import Acquire, Command, Done, Log, Move, MoveDone, Procedure, Verdict
from feedback.safety import (
    STOP_ERRORS,
    Guard,
    IntensityRule,
    Motion,
    PauseReason,
    finite_or_none,
    frame_problem,
    metric,
    stream_is_stale,
)

STEERING_ROLES = ("beam_x", "beam_y")
"""Default steering motor roles (x, y)."""


@dataclass(frozen=True)
class ResponseMatrix:
    """Centroid change per unit of each steering motor.

    Attributes
    ----------
    px_per_unit : ((float, float), (float, float))
        ``[[∂cx/∂ux, ∂cx/∂uy], [∂cy/∂ux, ∂cy/∂uy]]``, px per motor unit.
    pixel_nm : float or None
        Pixel size of the calibration frames, nm (None: never rescaled).
    roles : (str, str)
        Steering roles of the columns (x, y).
    """

    px_per_unit: tuple[tuple[float, float], tuple[float, float]]
    pixel_nm: float | None = None
    roles: tuple[str, str] = STEERING_ROLES

    def __post_init__(self) -> None:
        m = np.asarray(self.px_per_unit, dtype=np.float64)
        if m.shape != (2, 2) or not np.all(np.isfinite(m)):
            raise ValueError(f"ResponseMatrix.px_per_unit must be a finite 2x2 matrix, got "
                             f"{self.px_per_unit!r}")
        if self.pixel_nm is not None and not (self.pixel_nm > 0 and math.isfinite(self.pixel_nm)):
            raise ValueError(f"ResponseMatrix.pixel_nm must be > 0 or None, got {self.pixel_nm!r}")
        if len(self.roles) != 2 or self.roles[0] == self.roles[1]:
            raise ValueError(f"ResponseMatrix.roles must be two distinct roles, got {self.roles!r}")

    def matrix(self, pixel_nm: float | None = None) -> np.ndarray:
        """``R`` in px of ``pixel_nm`` per motor unit, shape (2, 2)."""
        m = np.asarray(self.px_per_unit, dtype=np.float64)
        if pixel_nm is not None and self.pixel_nm is not None and pixel_nm > 0:
            m = m * (self.pixel_nm / pixel_nm)
        return m

    @property
    def condition(self) -> float:
        """2-norm condition number (inf when singular)."""
        return float(np.linalg.cond(self.matrix()))

    def as_dict(self) -> dict[str, Any]:
        return {"px_per_unit": [list(r) for r in self.px_per_unit], "pixel_nm": self.pixel_nm,
                "roles": list(self.roles), "condition": self.condition}


def check_response(response: ResponseMatrix, max_condition: float) -> None:
    """Raise ``ValueError`` naming the problem if ``response`` is singular or ill-conditioned."""
    condition = response.condition
    if not math.isfinite(condition) or condition > max_condition:
        raise ValueError(f"response matrix {response.px_per_unit} has condition number "
                         f"{condition:.3g} > {max_condition:g}: steering would amplify centroid "
                         "noise (recalibrate with larger steps or other motors)")


class SetpointTable:
    """Centroid setpoint vs energy: linear between points, constant beyond the ends.

    Parameters
    ----------
    points : sequence of (energy_ev, x_px, y_px)
        At least one point, distinct energies.
    """

    def __init__(self, points: Sequence[tuple[float, float, float]]) -> None:
        arr = np.asarray(points, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] < 1:
            raise ValueError(f"setpoints must be (energy_ev, x_px, y_px) triples, got {points!r}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("setpoints must be finite")
        arr = arr[np.argsort(arr[:, 0])]
        if np.unique(arr[:, 0]).size != arr.shape[0]:
            raise ValueError("setpoint energies must be distinct")
        self._points = arr

    @classmethod
    def constant(cls, x_px: float, y_px: float) -> SetpointTable:
        """The same setpoint at every energy."""
        return cls([(0.0, x_px, y_px)])

    def at(self, energy_ev: float | None) -> np.ndarray:
        """Setpoint ``(x_px, y_px)`` at ``energy_ev`` (the first point's when None)."""
        p = self._points
        if energy_ev is None or p.shape[0] == 1:
            return p[0, 1:].copy()
        return np.array([np.interp(energy_ev, p[:, 0], p[:, 1]),
                         np.interp(energy_ev, p[:, 0], p[:, 2])])

    def as_list(self) -> list[list[float]]:
        return self._points.tolist()


class LoopState(enum.StrEnum):
    """State of the beam loop (the ``BEAMFB:STATE`` string)."""

    OFF = "off"
    RUNNING = "running"
    WAITING = "waiting"
    PAUSED = "paused"


@dataclass(frozen=True)
class BeamConfig:
    """Settings of :class:`BeamFeedback`.

    Attributes
    ----------
    integral_gain : float
        ``Ki``: fraction of the error removed per update by the integral action (0 < Ki ≤ 1).
    proportional_gain : float
        ``Kp`` on the change of the error (≥ 0; ``Ki + 2·Kp < 2`` keeps the static loop stable).
    deadband_px : float
        No move while the centroid error is below this, px.
    drive_margin : float
        Commands stay this far inside the soft limits (motor units).
    stale_after_s : float
        Pause when no Result arrived for this long.
    move_timeout_s : float
        Pause (IOC disconnect) when a commanded move is not reported done within this.
    intensity : IntensityRule
        Beam loss / low intensity against the mean counts when the loop started.
    max_condition : float
        Largest accepted condition number of the response matrix.
    """

    integral_gain: float = 0.7
    proportional_gain: float = 0.1
    deadband_px: float = 0.3
    drive_margin: float = 0.0
    stale_after_s: float = 2.0
    move_timeout_s: float = 10.0
    intensity: IntensityRule = field(default_factory=IntensityRule)
    max_condition: float = 20.0

    def __post_init__(self) -> None:
        if not 0 < self.integral_gain <= 1:
            raise ValueError(f"BeamConfig.integral_gain must be in (0, 1], got "
                             f"{self.integral_gain!r}")
        if not (self.proportional_gain >= 0
                and self.integral_gain + 2 * self.proportional_gain < 2):
            raise ValueError("BeamConfig: need proportional_gain >= 0 and integral_gain + "
                             "2·proportional_gain < 2 (stable loop)")
        for name in ("deadband_px", "drive_margin"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"BeamConfig.{name} must be >= 0")
        for name in ("stale_after_s", "move_timeout_s", "max_condition"):
            if not getattr(self, name) > 0:
                raise ValueError(f"BeamConfig.{name} must be > 0")


@dataclass(frozen=True)
class BeamStep:
    """What one :meth:`BeamFeedback.update` decided.

    Attributes
    ----------
    moves : tuple of Move
        Moves to put now (each within limits and the maximum step).
    state : LoopState
    reason : str or None
        Why paused or waiting, or what limited the moves (saturation).
    error_px : (float, float) or None
        Setpoint − centroid of the frame, px (None when not measured).
    """

    moves: tuple[Move, ...]
    state: LoopState
    reason: str | None = None
    error_px: tuple[float, float] | None = None


class BeamFeedback:
    """Continuous PI beam-position controller (pure: the executor feeds it and puts its moves).

    Parameters
    ----------
    guard : Guard
        Limits of the two steering roles.
    response : ResponseMatrix
        Measured response (:func:`calibrate_response`); refused if ill-conditioned.
    setpoints : SetpointTable
        Centroid setpoint vs energy.
    config : BeamConfig, optional

    Notes
    -----
    Executor protocol: :meth:`enable` / :meth:`disable` from the enable PV;
    :meth:`update` with every new Result (put the returned moves, then report each with
    :meth:`moved`, or a failure with :meth:`pause`); :meth:`tick` periodically (stale stream,
    moves that never finished); :meth:`pause` / :meth:`resume` for an IOC disconnect and
    reconnect. :attr:`state`, :attr:`reason` and :attr:`error_px` feed the state PVs.
    """

    def __init__(self, guard: Guard, response: ResponseMatrix, setpoints: SetpointTable,
                 config: BeamConfig | None = None) -> None:
        self.config = config if config is not None else BeamConfig()
        check_response(response, self.config.max_condition)
        self.guard = guard
        self.roles = response.roles
        for role in self.roles:
            lim = guard.limits(role)
            if 2 * self.config.drive_margin >= lim.high - lim.low:
                raise ValueError(f"drive_margin {self.config.drive_margin:g} leaves no drive "
                                 f"range for {role} within [{lim.low:g}, {lim.high:g}]")
        self.response = response
        self.setpoints = setpoints
        self.enabled = False
        self._external: dict[PauseReason, str] = {}
        self._internal: tuple[PauseReason, str] | None = None
        self._pending: dict[str, tuple[Move, int]] = {}
        self._done: dict[str, MoveDone] = {}
        self._previous: np.ndarray | None = None
        self._reference_counts: float | None = None
        self._last_seen_ns: int | None = None
        self.error_px: tuple[float, float] | None = None
        self.reason: str | None = PauseReason.ENABLE_OFF.value
        self.moves_issued = 0

    # -- operator ----------------------------------------------------------------------

    def enable(self, now_ns: int) -> None:
        """Switch on; the first fresh frame starts the loop from where the motors are."""
        if not self.enabled:
            self.enabled = True
            self._restart()
            self._last_seen_ns = now_ns

    def disable(self) -> None:
        """Switch off (nothing more is commanded until :meth:`enable`)."""
        self.enabled = False
        self._pending.clear()
        self.reason = PauseReason.ENABLE_OFF.value

    def set_setpoints(self, setpoints: SetpointTable) -> None:
        """New setpoint(s); the loop moves there at its own pace (the maximum step applies)."""
        self.setpoints = setpoints

    def set_setpoint(self, x_px: float, y_px: float) -> None:
        """One setpoint for every energy."""
        self.setpoints = SetpointTable.constant(x_px, y_px)

    # -- executor events ----------------------------------------------------------------

    def pause(self, reason: PauseReason, detail: str = "") -> None:
        """Pause for an external reason (IOC disconnect, a failed move) until :meth:`resume`."""
        self._external[PauseReason(reason)] = detail
        self._pending.clear()

    def resume(self, reason: PauseReason) -> None:
        """Clear an external pause reason; the loop restarts bumplessly when none is left."""
        if self._external.pop(PauseReason(reason), None) is not None and not self._external:
            self._restart()

    def moved(self, done: MoveDone) -> None:
        """The executor finished a move this controller commanded."""
        if done.role in self._pending:
            del self._pending[done.role]
            self._done[done.role] = done

    @property
    def state(self) -> LoopState:
        if not self.enabled:
            return LoopState.OFF
        if self._external or self._internal is not None:
            return LoopState.PAUSED
        if self._pending or self._previous is None:
            return LoopState.WAITING
        return LoopState.RUNNING

    def tick(self, now_ns: int) -> BeamStep:
        """Time-based checks: a stale stream and moves that never finished."""
        if not self.enabled:
            return self._step(())
        cfg = self.config
        for role, (_move, issued_ns) in list(self._pending.items()):
            if now_ns - issued_ns > cfg.move_timeout_s * 1e9:
                self.pause(PauseReason.IOC_DISCONNECT,
                           f"move of {role} not done within {cfg.move_timeout_s:g} s")
        if stream_is_stale(self._last_seen_ns, now_ns, cfg.stale_after_s):
            age = "ever" if self._last_seen_ns is None \
                else f"for {(now_ns - self._last_seen_ns) / 1e9:.3g} s"
            self._set_internal(PauseReason.STALE_STREAM, f"no result {age}")
        return self._step(())

    def update(self, result: dict[str, Any], now_ns: int) -> BeamStep:
        """Consider one Result; returns the moves to put (possibly none).

        Parameters
        ----------
        result : mapping
            A Result of a data frame (``t_ns``, ``moving``, ``positions`` with both steering
            roles, ``energy_ev``, ``pixel_nm``, ``metrics`` with ``centroid_x_px``,
            ``centroid_y_px``, ``mean_counts``).
        now_ns : int
            Arrival time (ns, wall clock), for the stale-stream rule.
        """
        if not self.enabled:
            return self._step(())
        self._last_seen_ns = now_ns
        if self._internal is not None and self._internal[0] == PauseReason.STALE_STREAM:
            self._clear_internal()
        if self._external or self._pending:
            return self._step(())
        problem = frame_problem(result, self._done.values(), self.guard.tolerances)
        if problem is not None:
            return self._step((), problem)
        counts = metric(result, "mean_counts")
        pause = self.config.intensity.check(counts, self._reference_counts)
        if pause is not None:
            self._set_internal(pause, f"mean counts {counts!r} (reference "
                                      f"{self._reference_counts!r})")
            return self._step(())
        if self._internal is not None:
            self._clear_internal()
        if self._reference_counts is None:
            self._reference_counts = counts
        cx, cy = metric(result, "centroid_x_px"), metric(result, "centroid_y_px")
        positions = result.get("positions") or {}
        actual = [finite_or_none(positions.get(role)) for role in self.roles]
        if cx is None or cy is None or None in actual:
            return self._step((), "frame has no centroid or no steering positions")
        energy = finite_or_none(result.get("energy_ev"))
        error = self.setpoints.at(energy) - np.array([cx, cy])
        self.error_px = (float(error[0]), float(error[1]))
        response = self.response.matrix(finite_or_none(result.get("pixel_nm")))
        error_units = np.linalg.solve(response, error)
        previous = self._previous if self._previous is not None else error_units
        self._previous = error_units
        if float(np.hypot(*error)) < self.config.deadband_px:
            return self._step((), None)
        delta = (self.config.integral_gain * error_units
                 + self.config.proportional_gain * (error_units - previous))
        return self._command(np.asarray(actual, dtype=np.float64), delta, error, response, now_ns)

    # -- internals ---------------------------------------------------------------------

    def _restart(self) -> None:
        """Bumpless (re)start: forget the previous error and the intensity reference."""
        self._previous = None
        self._reference_counts = None
        self._internal = None
        self._pending.clear()
        self._done.clear()  # moves before a pause are long done; the operator may have moved
        self.reason = None

    def _set_internal(self, reason: PauseReason, detail: str) -> None:
        if self._internal is None or self._internal[0] != reason:
            self._internal = (reason, detail)
            self._previous = None

    def _clear_internal(self) -> None:
        self._internal = None
        self._previous = None  # resume bumplessly
        self._reference_counts = None

    def _command(self, actual: np.ndarray, delta: np.ndarray, error: np.ndarray,
                 response: np.ndarray, now_ns: int) -> BeamStep:
        limits = [self.guard.limits(role) for role in self.roles]
        margin = self.config.drive_margin
        low = np.array([lim.low + margin for lim in limits])
        high = np.array([lim.high - margin for lim in limits])
        max_step = np.array([lim.max_step for lim in limits])
        notes = []
        scale = float(np.min(np.where(np.abs(delta) > max_step,
                                      max_step / np.maximum(np.abs(delta), 1e-300), 1.0)))
        if scale < 1.0:
            delta = delta * scale
            notes.append(f"step scaled to {scale:.3g} of the PI output (maximum step)")
        target = np.clip(actual + delta, low, high)
        held = target != actual + delta
        if held.sum() == 1:
            # One motor held at its drive limit: the other takes the best least-squares share
            # of the wanted centroid change (px), so its own axis is not steered off by the
            # cross-coupling of the held one.
            i, j = int(np.argmax(held)), int(np.argmin(held))
            wanted_px = response @ delta - response[:, i] * (target[i] - actual[i])
            column = response[:, j]
            step = float(column @ wanted_px / (column @ column))
            step = float(np.clip(step, -max_step[j], max_step[j]))
            target[j] = float(np.clip(actual[j] + step, low[j], high[j]))
        moves = []
        metrics = {"error_x_px": float(error[0]), "error_y_px": float(error[1])}
        for k, (role, lim) in enumerate(zip(self.roles, limits, strict=True)):
            if held[k]:
                notes.append(f"{role} held at its drive limit")
            step = float(target[k] - actual[k])
            if abs(step) > lim.max_step:
                continue  # the motor sits beyond the drive range: never jump back into it
            if abs(step) <= lim.tolerance or step == 0.0:
                continue  # below what a readback can confirm
            move = Move(role, float(target[k]), "beam position feedback", metrics,
                        float(actual[k]))
            moves.append(move)
            self._pending[role] = (move, now_ns)
        self.moves_issued += len(moves)
        return self._step(tuple(moves), "; ".join(notes) or None)

    def _step(self, moves: tuple[Move, ...], note: str | None = None) -> BeamStep:
        if not self.enabled:
            self.reason = PauseReason.ENABLE_OFF.value
        elif self._external:
            self.reason = "; ".join(f"{r}: {d}" if d else str(r)
                                    for r, d in self._external.items())
        elif self._internal is not None:
            self.reason = f"{self._internal[0]}: {self._internal[1]}"
        else:
            self.reason = note
        return BeamStep(moves, self.state, self.reason, self.error_px)


@dataclass(frozen=True)
class CalibrationConfig:
    """Settings of :func:`calibrate_response`.

    Attributes
    ----------
    roles : (str, str)
        Steering roles (x, y).
    delta : (float, float)
        Step of each motor around its start, motor units.
    frames_per_point : int
        Frames at each of the seven points.
    min_response_px : float
        A motor whose ``δ`` moves the centroid by less than this is not steering (``flat``).
    max_residual_px : float
        Largest RMS residual of the fit (a beam jump during the calibration exceeds it).
    attempts : int
        Times the seven points are measured afresh while the residual says the beam jumped.
    max_condition : float
        Largest accepted condition number.
    intensity : IntensityRule
        Dark frames abort the calibration.
    timeout_s : float or None
        Longest wait for frames per acquisition.
    """

    roles: tuple[str, str] = STEERING_ROLES
    delta: tuple[float, float] = (1.0, 1.0)
    frames_per_point: int = 3
    min_response_px: float = 2.0
    max_residual_px: float = 1.0
    max_condition: float = 20.0
    intensity: IntensityRule = field(default_factory=IntensityRule)
    timeout_s: float | None = None
    attempts: int = 3

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if len(self.delta) != 2 or not all(d > 0 and math.isfinite(d) for d in self.delta):
            raise ValueError(f"CalibrationConfig.delta must be two steps > 0, got {self.delta!r}")
        if self.frames_per_point < 1:
            raise ValueError("CalibrationConfig.frames_per_point must be >= 1")


def fit_response(t_s: np.ndarray, offsets: np.ndarray, centroids: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares ``c = c₀ + v·t + R·u`` over calibration samples.

    Parameters
    ----------
    t_s : ndarray, shape (n,)
        Sample times, s.
    offsets : ndarray, shape (n, 2)
        Motor offsets ``u`` from the start, motor units.
    centroids : ndarray, shape (n, 2)
        Centroids ``(x, y)``, px.

    Returns
    -------
    response : ndarray, shape (2, 2)
        ``R``, px per unit (rows x, y; columns motor x, y).
    drift_px_per_s : ndarray, shape (2,)
    residual_px : float
        RMS residual over both axes.
    """
    t = np.asarray(t_s, dtype=np.float64)
    u = np.asarray(offsets, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    if t.ndim != 1 or u.shape != (t.size, 2) or c.shape != (t.size, 2) or t.size < 5:
        raise ValueError(f"need n >= 5 samples with t (n,), offsets (n, 2), centroids (n, 2); "
                         f"got {t.shape}, {u.shape}, {c.shape}")
    design = np.column_stack([np.ones_like(t), t - t.mean(), u])
    coef, _, rank, _ = np.linalg.lstsq(design, c, rcond=None)
    if rank < 4:
        raise ValueError("calibration samples do not separate drift from the two motors")
    residual = c - design @ coef
    return coef[2:4].T.copy(), coef[1].copy(), float(np.sqrt(np.mean(residual ** 2)))


def calibrate_response(guard: Guard, config: CalibrationConfig | None = None) -> Procedure:
    """Measure the steering response matrix (a :mod:`feedback.commands` procedure).

    Yields
    ------
    Read, Move, Acquire, Log, then one Done
        ``Done.result``: ``verdict``, ``response`` (:meth:`ResponseMatrix.as_dict`, when
        resolved), ``drift_px_per_s``, ``residual_px``, ``frames_used``. Verdicts:
        ``resolved``; ``flat`` when a motor does not move the centroid; ``ambiguous`` when the
        fit stays poor (a jump) in every one of ``attempts`` measurements or the matrix is
        ill-conditioned; ``aborted``. The motors end where they started.
    """
    cfg = config if config is not None else CalibrationConfig()
    return _calibrate(Motion(guard), cfg)


def _calibrate(motion: Motion, cfg: CalibrationConfig) -> Procedure:
    samples: list[tuple[float, float, float, float, float]] = []
    state: dict[str, Any] = {"pixel_nm": None, "reference": None}
    try:
        verdict, reason, result = yield from _calibration(motion, cfg, samples, state)
        for role in cfg.roles:
            if role in motion.start:
                yield from motion.move(role, motion.start[role], "calibration: back to start")
        done = Done(verdict, reason, {"verdict": str(verdict), **result,
                                      "frames_used": len(samples)})
    except STOP_ERRORS as exc:
        done = Done(Verdict.ABORTED, f"{type(exc).__name__}: {exc}",
                    {"verdict": str(Verdict.ABORTED), "frames_used": len(samples)})
    yield done
    return done


def _measure_pattern(motion: Motion, cfg: CalibrationConfig, start: tuple[float, float],
                     samples: list, state: dict
                     ) -> Generator[Command, Any, tuple[np.ndarray, np.ndarray, float] | str]:
    """Centroids at the seven points around ``start``, fitted; a reason string to abort."""
    rx, ry = cfg.roles
    dx, dy = cfg.delta
    taken_here: list[tuple[float, float, float, float, float]] = []
    pattern = [(0, 0), (dx, 0), (-dx, 0), (0, 0), (0, dy), (0, -dy), (0, 0)]
    for ox, oy in pattern:
        for role, target in ((rx, start[0] + ox), (ry, start[1] + oy)):
            if motion.position[role] != target:
                yield from motion.move(role, target, "steering response calibration")
        for _attempt in range(2):
            results = yield Acquire(cfg.frames_per_point, after_move=bool(motion.done),
                                    keys=("centroid_x_px", "centroid_y_px", "mean_counts"),
                                    timeout_s=cfg.timeout_s)
            usable, problems = motion.fresh(list(results))
            if problems:
                yield Log(f"calibration: dropped {len(problems)} frame(s)", "warning",
                          {"reasons": problems})
            taken = 0
            for r in usable:
                counts = metric(r, "mean_counts")
                pause = cfg.intensity.check(counts, state["reference"])
                if pause is not None:
                    return f"{pause} (mean counts {counts!r})"
                state["reference"] = state["reference"] or counts
                cx, cy = metric(r, "centroid_x_px"), metric(r, "centroid_y_px")
                if cx is None or cy is None:
                    continue
                state["pixel_nm"] = state["pixel_nm"] or finite_or_none(r.get("pixel_nm"))
                taken_here.append((r["t_ns"] * 1e-9, float(ox), float(oy), cx, cy))
                taken += 1
            if taken:
                break
        else:
            return f"no usable centroid at offset ({ox:g}, {oy:g})"
    samples.extend(taken_here)
    arr = np.asarray(taken_here)
    return fit_response(arr[:, 0], arr[:, 1:3], arr[:, 3:5])


def _calibration(motion: Motion, cfg: CalibrationConfig, samples: list, state: dict
                 ) -> Generator[Command, Any, tuple[Verdict, str, dict[str, Any]]]:
    rx, ry = cfg.roles
    x0 = yield from motion.read(rx)
    y0 = yield from motion.read(ry)
    dx, dy = cfg.delta
    for attempt in range(1, cfg.attempts + 1):
        fit = yield from _measure_pattern(motion, cfg, (x0, y0), samples, state)
        if isinstance(fit, str):
            return Verdict.ABORTED, fit, {}
        response, drift, residual = fit
        info = {"drift_px_per_s": drift.tolist(), "residual_px": residual,
                "response_px_per_unit": response.tolist(), "attempts": attempt}
        if residual <= cfg.max_residual_px:
            break
        if attempt < cfg.attempts:
            yield Log(f"calibration: fit residual {residual:.3g} px > {cfg.max_residual_px:g} "
                      f"px (a beam jump?); measuring again ({attempt + 1}/{cfg.attempts})",
                      "warning", info)
    else:
        return Verdict.AMBIGUOUS, (f"fit residual {residual:.3g} px > {cfg.max_residual_px:g} px "
                                   f"in {cfg.attempts} attempt(s) (beam jumps during the "
                                   "calibration?); repeat it"), info
    moved = np.hypot(response[0], response[1]) * np.array([dx, dy])
    if np.any(moved < cfg.min_response_px):
        return Verdict.FLAT, (f"the centroid moved only {moved.round(3).tolist()} px for steps "
                              f"of {list(cfg.delta)}: not steering"), info
    matrix = ResponseMatrix(tuple(map(tuple, response.tolist())), state["pixel_nm"], cfg.roles)
    try:
        check_response(matrix, cfg.max_condition)
    except ValueError as exc:
        return Verdict.AMBIGUOUS, str(exc), info
    return Verdict.RESOLVED, (f"response {np.round(response, 4).tolist()} px/unit, condition "
                              f"{matrix.condition:.3g}"), {**info, "response": matrix.as_dict()}
