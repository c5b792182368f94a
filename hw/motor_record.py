"""A simulated EPICS motor record served by caproto.

:class:`MotorRecord` is a caproto ``PVGroup`` holding one record of type ``motor``: caproto's
motor-record field set (``RTYP`` reads ``motor``; every field a client such as
``epics.Motor`` or ophyd's ``EpicsMotor`` reads exists), with the behaviour of a real motor
record on the fields that matter:

- ``.VAL`` put: a move at ``.VELO`` (constant speed, no acceleration ramp). ``.DMOV`` drops
  to 0 and ``.MOVN`` rises to 1 for the motion; ``.RBV``/``.DRBV``/``.RRBV`` update every
  ``tick_s`` (default 20 ms) and end exactly on the target. The put *completes* (CA put
  callback, ``caput -c``, pyepics ``put(wait=True)``) only when the motion is done; a new
  put during a move retargets it and every pending put completes when the motor stops.
- Soft limits: a target outside ``[.LLM, .HLM]`` is accepted as a put, as a real motor
  record does, but causes no motion: ``.LVIO`` becomes 1, ``.VAL`` keeps its previous value
  and the put completes at once. The next in-limit target clears ``.LVIO``.
  ``.HLM == .LLM == 0`` means no soft limits (as in the real record).
- ``.STOP`` = 1 halts at the present position (``.VAL`` is set there, pending puts
  complete, ``.STOP`` reads 0 again). ``.SPMG`` Stop halts likewise and Pause halts keeping
  the target; while Stop/Pause, ``.VAL`` puts are stored without moving; Go/Move resume the
  move to ``.VAL`` (Move is treated as Go).
- ``.DVAL``, ``.RLV`` and ``.TWF``/``.TWR`` (by ``.TWV``) are moves like ``.VAL``.
- Dial and user coordinates coincide: ``.OFF`` = 0 and ``.DIR`` = Pos are fixed, and puts to
  ``.OFF``, ``.DIR`` or ``.SET`` = Set are refused with an error (no redefinition of
  positions). ``.DHLM``/``.DLLM`` mirror ``.HLM``/``.LLM``.

Server-side code on any thread reads the motor without CA through :meth:`position`,
:attr:`moving`, :meth:`moved_between`, :attr:`limits` (thread safe; positions are computed
from the commanded trajectory, so they are exact at any instant, not sampled at ticks).
Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from caproto import AlarmSeverity, AlarmStatus, SkipWrite
from caproto.server import PVGroup, pvproperty
from caproto.server.common import HIGH_LOAD_TIMEOUT

# Bits of .MSTA (motor status) as defined by the EPICS motor module (motor.h).
MSTA_DIRECTION = 1 << 0
MSTA_DONE = 1 << 1
MSTA_MOVING = 1 << 10
MSTA_HOMED = 1 << 14

SPMG_HALTING = ("Stop", "Pause")

MONITOR_FLUSH_S = 3 * HIGH_LOAD_TIMEOUT
"""Delay of a put completion after the last field update of the move.

caproto sends monitors through a batching queue but a put completion directly, so without
this delay a client could see the completion before the final ``.RBV``/``.DMOV``/``.LVIO``
monitors; ``epics.Motor`` reads those right after ``move(wait=True)``. Three batching
timeouts of the same event loop is enough for the monitors to leave first.
"""


@dataclass(frozen=True)
class Trajectory:
    """A constant-speed move from ``start`` (at ``t0``) to ``target``.

    Attributes
    ----------
    start, target : float
        Positions, user units.
    t0 : float
        Start time, ``time.monotonic()`` s.
    velocity : float
        Speed, user units per s (> 0).
    """

    start: float
    target: float
    t0: float
    velocity: float

    @classmethod
    def at_rest(cls, position: float, t: float) -> Trajectory:
        return cls(position, position, t, 1.0)

    @property
    def t_end(self) -> float:
        return self.t0 + abs(self.target - self.start) / self.velocity

    def position(self, t: float) -> float:
        if t >= self.t_end:
            return self.target
        travelled = self.velocity * max(t - self.t0, 0.0)
        return self.start + math.copysign(travelled, self.target - self.start)


def _check_motor_args(velocity: float, low_limit: float, high_limit: float, initial: float,
                      tick_s: float) -> None:
    for label, value in (("velocity", velocity), ("low_limit", low_limit),
                         ("high_limit", high_limit), ("initial", initial), ("tick_s", tick_s)):
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"motor {label} must be a finite number, got {value!r}")
    if velocity <= 0:
        raise ValueError(f"motor velocity must be > 0, got {velocity}")
    if tick_s <= 0:
        raise ValueError(f"motor tick_s must be > 0, got {tick_s}")
    if low_limit > high_limit:
        raise ValueError(f"motor low_limit {low_limit} is above high_limit {high_limit}")
    if (low_limit, high_limit) != (0, 0) and not low_limit <= initial <= high_limit:
        raise ValueError(f"motor initial position {initial} is outside "
                         f"[{low_limit}, {high_limit}]")


class MotorRecord(PVGroup):
    """One simulated motor record named ``prefix`` (fields ``prefix.VAL`` ...).

    Parameters
    ----------
    prefix : str
        Record name, e.g. ``"TXMSIM:ZP:Z"``.
    velocity : float
        ``.VELO``, user units per s.
    low_limit, high_limit : float
        ``.LLM``/``.HLM`` soft limits, user units (both 0: no limits).
    initial : float
        Position at start-up.
    egu : str
        ``.EGU`` engineering units.
    desc : str
        ``.DESC`` description.
    precision : int
        ``.PREC`` display precision.
    tick_s : float
        Readback update period while moving, s.
    resolution : float
        ``.MRES`` (user units per raw step), used for ``.RRBV``/``.RVAL``.
    """

    motor = pvproperty(value=0.0, name="", record="motor", precision=3,
                       doc="simulated motor record")

    def __init__(self, prefix: str, *, velocity: float, low_limit: float, high_limit: float,
                 initial: float = 0.0, egu: str = "", desc: str = "", precision: int = 3,
                 tick_s: float = 0.02, resolution: float = 1e-3, **kwargs: Any) -> None:
        _check_motor_args(velocity, low_limit, high_limit, initial, tick_s)
        if not resolution > 0:
            raise ValueError(f"motor resolution must be > 0, got {resolution}")
        super().__init__(prefix, **kwargs)
        self.velocity = float(velocity)
        self.egu, self.desc, self.precision = egu, desc, int(precision)
        self.tick_s = float(tick_s)
        self.resolution = float(resolution)
        self._lock = threading.Lock()
        self._limits = (float(low_limit), float(high_limit))
        self._traj = Trajectory.at_rest(float(initial), time.monotonic())
        self._moving = False
        # (start, end) of every motion, end None while moving; bounded history
        self._intervals: deque[list[float | None]] = deque(maxlen=1024)
        self.initialized = threading.Event()
        # asyncio objects belong to the server loop: made in the startup hook
        self._wake: asyncio.Event | None = None
        self._done: asyncio.Event | None = None

    # -- thread-safe reads for server-side code --------------------------------------------
    def position(self, t: float | None = None) -> float:
        """Position (user units) at monotonic time ``t`` (now when None)."""
        t = time.monotonic() if t is None else t
        with self._lock:
            return self._traj.position(t)

    @property
    def trajectory(self) -> Trajectory:
        """The present (or last) commanded motion; positions follow it exactly."""
        with self._lock:
            return self._traj

    @property
    def moving(self) -> bool:
        """True from a move's start until ``.DMOV`` returns to 1."""
        with self._lock:
            return self._moving

    @property
    def limits(self) -> tuple[float, float]:
        """``(.LLM, .HLM)``."""
        with self._lock:
            return self._limits

    def moved_between(self, t0: float, t1: float) -> bool:
        """True if the motor was moving at any time in ``[t0, t1]`` (monotonic s)."""
        if t1 < t0:
            raise ValueError(f"moved_between: t1 {t1} is before t0 {t0}")
        with self._lock:
            return any(start <= t1 and (end is None or end >= t0)
                       for start, end in self._intervals)

    # -- record behaviour -------------------------------------------------------------------
    def _within_limits(self, target: float) -> bool:
        low, high = self.limits
        return (low, high) == (0.0, 0.0) or low <= target <= high

    def _halted(self) -> bool:
        return self.motor.field_inst.stop_pause_move_go.value in SPMG_HALTING

    def _start_move(self, target: float) -> asyncio.Event:
        """Retarget from wherever the motor is now; the event is set when it stops."""
        now = time.monotonic()
        with self._lock:
            self._traj = Trajectory(self._traj.position(now), target, now, self.velocity)
            if not self._moving:
                self._moving = True
                self._intervals.append([now, None])
        if self._done is None:
            self._done = asyncio.Event()
        self._wake.set()
        return self._done

    def _halt(self) -> float:
        """Stop at the present position; returns it."""
        now = time.monotonic()
        with self._lock:
            here = self._traj.position(now)
            self._traj = Trajectory.at_rest(here, now)
        if self._wake is not None:
            self._wake.set()
        return here

    async def _post_targets(self, target: float) -> None:
        fields = self.motor.field_inst
        await self.motor.write(target, verify_value=False)
        await fields.dial_desired_value.write(target, verify_value=False)
        await fields.raw_desired_value.write(round(target / self.resolution),
                                             verify_value=False)

    async def _post_readback(self, position: float, moving: bool, direction_up: bool) -> None:
        fields = self.motor.field_inst
        await fields.user_readback_value.write(position)
        await fields.dial_readback_value.write(position)
        await fields.raw_readback_value.write(round(position / self.resolution))
        await fields.difference_dval_drbv.write(fields.dial_desired_value.value - position)
        status = MSTA_HOMED | (MSTA_DIRECTION if direction_up else 0)
        status |= MSTA_MOVING if moving else MSTA_DONE
        await fields.motor_status.write(status)

    async def request_move(self, target: float) -> bool:
        """The ``.VAL`` put, on the server loop: returns when the motion is done.

        Returns False, with ``.LVIO`` = 1 and no motion, for a target outside the soft
        limits; True otherwise (also while SPMG is Stop/Pause, when the target is only
        stored).
        """
        fields = self.motor.field_inst
        if not math.isfinite(target):
            raise ValueError(f"{self.prefix}: target {target!r} is not finite")
        if not self._within_limits(target):
            low, high = self.limits
            await fields.limit_violation.write(1)
            self.log.warning("%s: target %g outside soft limits [%g, %g]: not moving",
                             self.prefix, target, low, high)
            await asyncio.sleep(MONITOR_FLUSH_S)
            return False
        await fields.limit_violation.write(0)
        await self._post_targets(target)
        if not self._halted():
            await fields.done_moving_to_value.write(0)
            await self._start_move(target).wait()
        await asyncio.sleep(MONITOR_FLUSH_S)
        return True

    async def _motion_loop(self) -> None:
        fields = self.motor.field_inst
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._done is None:  # a halt while at rest: nothing to do
                continue
            await fields.done_moving_to_value.write(0)
            await fields.motor_is_moving.write(1)
            await fields.motion_in_progress.write(1)
            while True:
                now = time.monotonic()
                with self._lock:
                    traj = self._traj
                up = traj.target >= traj.start
                await fields.direction_of_travel.write(int(up))
                await self._post_readback(traj.position(now), True, up)
                if now >= traj.t_end and not self._wake.is_set():
                    break
                self._wake.clear()
                # land the last tick on the arrival time, not up to a tick after it
                await asyncio.sleep(min(self.tick_s, max(traj.t_end - now, 0.0)) or 1e-3)
            # no await from the break to here: a put that comes in after this point starts
            # a new motion and gets a new completion event
            now = time.monotonic()
            with self._lock:
                self._moving = False
                self._intervals[-1][1] = now
                final = self._traj.position(now)
            done, self._done = self._done, None
            await self._post_readback(final, False, up)
            await fields.motor_is_moving.write(0)
            await fields.motion_in_progress.write(0)
            await fields.done_moving_to_value.write(1)
            done.set()

    async def _initialize(self) -> None:
        fields = self.motor.field_inst
        low, high = self.limits
        position = self.position()
        await fields.description.write(self.desc)
        await fields.engineering_units.write(self.egu)
        await fields.display_precision.write(self.precision)
        await fields.velocity.write(self.velocity)
        await fields.max_speed.write(self.velocity)
        await fields.base_velocity.write(0.0)
        await fields.seconds_to_velocity.write(0.0)
        await fields.motor_step_size.write(self.resolution)
        await fields.retry_deadband.write(self.resolution)
        await fields.tweak_step_size.write(max((high - low) / 100.0, self.resolution))
        await fields.user_offset.write(0.0)
        await fields.user_direction.write("Pos")
        await fields.set_use_switch.write("Use")
        await fields.stop_pause_move_go.write("Go")
        await fields.stop.write(0)
        await fields.limit_violation.write(0)
        await fields.user_high_limit_switch.write(0)
        await fields.user_low_limit_switch.write(0)
        await fields.user_high_limit.write(high)  # the putters mirror them to DHLM/DLLM
        await fields.user_low_limit.write(low)
        await fields.motor_is_moving.write(0)
        await fields.done_moving_to_value.write(1)
        await self._post_targets(position)
        await self._post_readback(position, False, True)
        for channel in (self.motor, fields.user_readback_value, fields.dial_readback_value,
                        fields.dial_desired_value, fields.user_high_limit,
                        fields.user_low_limit):
            await channel.write_metadata(units=self.egu, precision=self.precision,
                                         upper_disp_limit=high, lower_disp_limit=low)
        await self.motor.alarm.write(status=AlarmStatus.NO_ALARM,
                                     severity=AlarmSeverity.NO_ALARM)

    @motor.startup
    async def motor(self, instance: Any, async_lib: Any) -> None:
        self._wake = asyncio.Event()
        await self._initialize()
        self.initialized.set()
        await self._motion_loop()

    @motor.putter
    async def motor(self, instance: Any, value: float) -> float:
        if not await self.request_move(float(value)):
            return instance.value  # a refused target leaves VAL where it was
        raise SkipWrite  # VAL was posted when the move started

    # -- fields with record behaviour --------------------------------------------------------
    @motor.fields.stop.putter
    async def motor(fields: Any, instance: Any, value: int) -> int:
        group: MotorRecord = fields.parent.group
        if value:
            await group._post_targets(group._halt())
        return 0

    @motor.fields.stop_pause_move_go.putter
    async def motor(fields: Any, instance: Any, value: str) -> str:
        group: MotorRecord = fields.parent.group
        if value == "Stop":
            await group._post_targets(group._halt())
        elif value == "Pause":
            group._halt()
        elif group.motor.value != group.position() and group.initialized.is_set():
            await instance.write(value, verify_value=False)
            # resuming is a move with nobody waiting on it: run it as its own task
            asyncio.get_running_loop().create_task(group.request_move(group.motor.value))
            raise SkipWrite
        return value

    @motor.fields.dial_desired_value.putter
    async def motor(fields: Any, instance: Any, value: float) -> float:
        await fields.parent.write(value)  # dial == user: the .VAL path, limits and wait
        raise SkipWrite

    @motor.fields.relative_value.putter
    async def motor(fields: Any, instance: Any, value: float) -> float:
        if value:
            await fields.parent.write(fields.parent.value + value)
        return 0.0

    @motor.fields.tweak_motor_forward.putter
    async def motor(fields: Any, instance: Any, value: int) -> int:
        if value:
            await fields.parent.write(fields.parent.value + fields.tweak_step_size.value)
        return 0

    @motor.fields.tweak_motor_reverse.putter
    async def motor(fields: Any, instance: Any, value: int) -> int:
        if value:
            await fields.parent.write(fields.parent.value - fields.tweak_step_size.value)
        return 0

    @motor.fields.velocity.putter
    async def motor(fields: Any, instance: Any, value: float) -> float:
        group: MotorRecord = fields.parent.group
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"{group.prefix}.VELO must be > 0, got {value}")
        group.velocity = float(value)
        if group.moving:  # a real record applies a new speed to the move under way
            group._start_move(group.trajectory.target)
        return value

    @motor.fields.user_high_limit.putter
    async def motor(fields: Any, instance: Any, value: float) -> float:
        group: MotorRecord = fields.parent.group
        with group._lock:
            group._limits = (group._limits[0], float(value))
        await fields.dial_high_limit.write(value, verify_value=False)
        return value

    @motor.fields.user_low_limit.putter
    async def motor(fields: Any, instance: Any, value: float) -> float:
        group: MotorRecord = fields.parent.group
        with group._lock:
            group._limits = (float(value), group._limits[1])
        await fields.dial_low_limit.write(value, verify_value=False)
        return value

    @motor.fields.dial_high_limit.putter
    async def motor(fields: Any, instance: Any, value: float) -> float:
        await fields.user_high_limit.write(value)
        return value

    @motor.fields.dial_low_limit.putter
    async def motor(fields: Any, instance: Any, value: float) -> float:
        await fields.user_low_limit.write(value)
        return value

    @motor.fields.user_offset.putter
    async def motor(fields: Any, instance: Any, value: float) -> float:
        if value != 0:
            raise ValueError(f"{fields.parent.group.prefix}: the simulated motor has no "
                             "user offset (.OFF is fixed at 0)")
        return value

    @motor.fields.user_direction.putter
    async def motor(fields: Any, instance: Any, value: str) -> str:
        if value != "Pos":
            raise ValueError(f"{fields.parent.group.prefix}: the simulated motor's .DIR is "
                             "fixed at Pos")
        return value

    @motor.fields.set_use_switch.putter
    async def motor(fields: Any, instance: Any, value: str) -> str:
        if value != "Use":
            raise ValueError(f"{fields.parent.group.prefix}: the simulated motor cannot "
                             "redefine its position (.SET is fixed at Use)")
        return value
