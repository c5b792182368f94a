"""The actuator contract the feedback executor drives, an EPICS motor-record implementation
over pyepics, and an in-process fake for unit tests.

:class:`Actuator` is deliberately small (like bluesky's ``Movable``/``Stoppable`` hardware
protocols): a name, a unit, soft limits, the position, a move with wait/timeout, a stop and
a moving flag. Both implementations refuse a target outside the limits *before* anything
moves, with :class:`LimitError`, never clipping it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import epics


class LimitError(ValueError):
    """A target outside an actuator's soft limits; nothing was moved."""


class MoveError(RuntimeError):
    """A move that started but did not end where and when it should have."""


@runtime_checkable
class Actuator(Protocol):
    """Something the executor moves: a motor, an energy, a shaker setting.

    Attributes
    ----------
    name : str
        Role, e.g. ``"zp_z_um"``.
    unit : str
        Unit of positions, e.g. ``"um"``.
    """

    name: str
    unit: str

    @property
    def limits(self) -> tuple[float, float]:
        """``(low, high)`` soft limits, in ``unit``."""
        ...

    @property
    def position(self) -> float:
        """Readback position, in ``unit``."""
        ...

    @property
    def moving(self) -> bool:
        """True while a move is under way."""
        ...

    def move(self, target: float, wait: bool = True, timeout: float | None = None) -> None:
        """Move to ``target``; with ``wait``, return when the move is done.

        Raises :class:`LimitError` (nothing moved) for a target outside :attr:`limits`,
        ``TimeoutError`` if a waited move is not done within ``timeout`` s.
        """
        ...

    def stop(self) -> None:
        """Stop now, where the actuator is."""
        ...


def check_target(name: str, target: float, limits: tuple[float, float], unit: str) -> float:
    """``target`` as a float if it is finite and within ``limits``; LimitError otherwise."""
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise LimitError(f"{name}: target {target!r} is not a number") from None
    if not math.isfinite(value):
        raise LimitError(f"{name}: target {value} is not finite")
    low, high = limits
    if not low <= value <= high:
        raise LimitError(f"{name}: target {value:g} {unit} is outside the soft limits "
                         f"[{low:g}, {high:g}] {unit}; not moving")
    return value


class EpicsMotor:
    """An EPICS motor record driven as ``epics.Motor`` drives it.

    Parameters
    ----------
    pv_base : str
        Record name (``"TXMSIM:ZP:Z"``), from :func:`hw.pvnames.motor_pv`.
    name : str, optional
        Role name; the record name when None.
    connect_timeout : float
        Seconds to wait for the record to connect.
    settle_s : float
        Extra time allowed, on top of distance/velocity, before a waited move times out.

    Notes
    -----
    pyepics must have been pointed at the right CA servers first
    (:func:`hw.epics_env.configure_ca_client`). Raises ``ConnectionError`` if the record does
    not connect and ``TypeError`` (from ``epics.Motor``) if it is not a motor record.
    """

    def __init__(self, pv_base: str, name: str | None = None, *,
                 connect_timeout: float = 5.0, settle_s: float = 5.0) -> None:
        self.pv_base = pv_base
        self.name = name or pv_base
        self.settle_s = settle_s
        record_type = epics.get_pv(f"{pv_base}.RTYP", connect=True, timeout=connect_timeout)
        if not record_type.connected:
            raise ConnectionError(f"{self.name}: record {pv_base} did not connect within "
                                  f"{connect_timeout} s")
        try:
            self._motor = epics.Motor(pv_base, timeout=connect_timeout)
        except epics.motor.MotorException as exc:
            raise TypeError(f"{self.name}: {pv_base} is not a motor record: {exc}") from exc
        unit = self._motor.get("EGU", as_string=True)
        self.unit = unit or ""
        # The .VAL channel of the last un-waited move: its put callback completes when the
        # record's motion is done.
        self._pending: epics.PV | None = None

    def _get(self, field: str) -> float:
        value = self._motor.get(field)
        if value is None:
            raise ConnectionError(f"{self.name}: no value for {self.pv_base}.{field} "
                                  "(disconnected?)")
        return value

    @property
    def limits(self) -> tuple[float, float]:
        return float(self._get("LLM")), float(self._get("HLM"))

    @property
    def position(self) -> float:
        return float(self._get("RBV"))

    @property
    def velocity(self) -> float:
        return float(self._get("VELO"))

    @property
    def moving(self) -> bool:
        # Right after an un-waited put, .DMOV and .RBV may still describe the motor before the
        # move: a step smaller than the caller's tolerance then looked done before it started.
        # The put callback of that move says when the record has finished it.
        if self._pending is not None and not self._pending.put_complete:
            return True
        # Read .DMOV from the IOC, not from the monitor cache: a motion-done poll that trusts
        # a cached 0 was seen to wait out its timeout with the motor long at rest.
        value = self._motor.PV("DMOV").get(use_monitor=False, timeout=2.0)
        if value is None:
            raise ConnectionError(f"{self.name}: no value for {self.pv_base}.DMOV "
                                  "(disconnected?)")
        return int(value) == 0

    def move(self, target: float, wait: bool = True, timeout: float | None = None) -> None:
        """Move to ``target`` (see :meth:`Actuator.move`).

        Without ``timeout`` a waited move may take distance/``.VELO`` + ``settle_s``.
        """
        target = check_target(self.name, target, self.limits, self.unit)
        if timeout is None:
            velocity = self.velocity
            travel = abs(target - self.position) / velocity if velocity > 0 else 0.0
            timeout = travel + self.settle_s
        if wait:
            status = self._motor.move(target, wait=True, timeout=timeout)
        else:
            status = self._start_move(target)
        if status == -12:
            raise LimitError(f"{self.name}: the record refused {target:g} {self.unit} as "
                             "outside its limits")
        if status == -11:
            raise ConnectionError(f"{self.name}: {self.pv_base} is not connected")
        if status in (-8, -7):
            raise TimeoutError(f"{self.name}: move to {target:g} {self.unit} not done within "
                               f"{timeout:.3g} s")
        if status in (-4, 4):
            raise LimitError(f"{self.name}: soft limit violation reported by {self.pv_base} "
                             f"(.LVIO) for target {target:g} {self.unit}")
        if status in (-3, 3):
            raise MoveError(f"{self.name}: hard limit switch hit moving to {target:g}")
        if status not in (0, 1):
            raise MoveError(f"{self.name}: move to {target:g} failed (epics.Motor status "
                            f"{status})")

    def _start_move(self, target: float) -> int:
        """Put ``target`` with a completion callback; an ``epics.Motor.move`` status."""
        if not self._motor.within_limits(target):
            return -12
        pv = self._motor.PV("VAL")
        if not pv.wait_for_connection(timeout=2.0):
            return -11
        pv.put(target, use_complete=True)
        self._pending = pv
        # The record answers a put outside its limits with .LVIO; read it from the IOC (a
        # cached 1 may be left from an earlier refusal).
        lvio = self._motor.PV("LVIO").get(use_monitor=False, timeout=2.0)
        return 4 if lvio == 1 else 0

    def stop(self) -> None:
        self._motor.put("STOP", 1)

    def __repr__(self) -> str:
        return f"EpicsMotor({self.pv_base!r}, name={self.name!r})"


class FakeActuator:
    """An in-process actuator for controller tests: constant-speed motion on a clock.

    Parameters
    ----------
    name : str
        Role name.
    unit : str
        Unit of positions.
    limits : (float, float)
        Soft limits.
    position : float
        Start position.
    velocity : float or None
        Speed, unit/s; None moves instantly.
    clock : callable
        Time source, s (``time.monotonic``; a test may pass a fake clock).
    sleep : callable
        Used to wait for a move (``time.sleep``; pair a fake clock with a fake sleep).

    Attributes
    ----------
    moves : list of float
        Every accepted target, in order (refused ones are not there).
    """

    def __init__(self, name: str, unit: str = "", limits: tuple[float, float] = (-math.inf,
                                                                                 math.inf),
                 position: float = 0.0, velocity: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        low, high = (float(v) for v in limits)
        if low > high:
            raise ValueError(f"{name}: low limit {low} is above high limit {high}")
        if velocity is not None and not velocity > 0:
            raise ValueError(f"{name}: velocity must be > 0 or None, got {velocity}")
        self.name, self.unit = name, unit
        self._limits = (low, high)
        self.velocity = velocity
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        now = clock()
        self._start, self._target, self._t0, self._t_end = position, position, now, now
        self.moves: list[float] = []

    @property
    def limits(self) -> tuple[float, float]:
        return self._limits

    def _position_at(self, t: float) -> float:
        if t >= self._t_end or self._t_end == self._t0:
            return self._target
        fraction = (t - self._t0) / (self._t_end - self._t0)
        return self._start + fraction * (self._target - self._start)

    @property
    def position(self) -> float:
        with self._lock:
            return self._position_at(self._clock())

    @property
    def moving(self) -> bool:
        with self._lock:
            return self._clock() < self._t_end

    def move(self, target: float, wait: bool = True, timeout: float | None = None) -> None:
        target = check_target(self.name, target, self._limits, self.unit)
        with self._lock:
            now = self._clock()
            start = self._position_at(now)
            duration = 0.0 if self.velocity is None else abs(target - start) / self.velocity
            self._start, self._target, self._t0, self._t_end = start, target, now, now + duration
            self.moves.append(target)
        if wait and duration > 0:
            if timeout is not None and duration > timeout:
                self._sleep(timeout)
                raise TimeoutError(f"{self.name}: move to {target:g} {self.unit} not done "
                                   f"within {timeout:g} s")
            self._sleep(duration)

    def stop(self) -> None:
        with self._lock:
            now = self._clock()
            here = self._position_at(now)
            self._start, self._target, self._t0, self._t_end = here, here, now, now

    def __repr__(self) -> str:
        return f"FakeActuator({self.name!r}, position={self.position:g} {self.unit})"
