"""The simulated beamline IOC: motor records, camera/shutter/ring PVs and simulation truth.

:class:`SimIOC` serves, with caproto on one CA port, under a prefix (default ``TXMSIM:``):

- motor records (:class:`~hw.motor_record.MotorRecord`) for every role of
  :data:`hw.pvnames.MOTOR_ROLES`: ``ZP:Z``, ``ZP:X``, ``ZP:Y``, ``SAMPLE:X``, ``SAMPLE:Y``,
  ``SAMPLE:THETA``, ``ENERGY`` (eV), ``SHAKER:AMP`` (µm), ``SHAKER:FREQ`` (Hz), ``BEAM:X``,
  ``BEAM:Y`` (condenser steering);
- ``CAM:Acquire`` (Done/Acquire), ``CAM:AcquireTime`` (s), ``CAM:FrameType``
  (Normal/Background/FlatField, the areaDetector convention), ``CAM:ArrayCounter_RBV``,
  ``SHUTTER`` (Closed/Open), ``RING:CURRENT`` (mA; put 0 to simulate a beam loss);
- read-only simulation truth ``TRUTH:FOCUS_Z_UM``, ``TRUTH:BEAM_X_PX``, ``TRUTH:BEAM_Y_PX``,
  ``TRUTH:UNIFORMITY_CV``, ``TRUTH:RESOLUTION_NM`` (NaN until the frame generator sets them).

The frame generator (the optics model and detector, in other modules) runs on its own thread
and talks to the IOC without Channel Access: :meth:`SimIOC.snapshot` reads the motor
positions and the camera/shutter/ring state at one instant, :meth:`SimIOC.moved_between`
says whether a motor moved during an exposure, and :meth:`SimIOC.set_truth` /
:meth:`SimIOC.set_array_counter` / :meth:`SimIOC.set_ring_current` publish values
(thread safe, keep-latest, never blocking the generator).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from caproto import ChannelType
from caproto.server import PVGroup, pvproperty

from hw import pvnames
from hw.epics_env import LOOPBACK, CaServerThread
from hw.motor_record import MotorRecord

FRAME_TYPES = ("Normal", "Background", "FlatField")
"""areaDetector ``FrameType`` choices of ``CAM:FrameType`` (their meaning for a frame's kind
lives with the detector model, :mod:`hw.sim.detector`)."""


@dataclass(frozen=True)
class MotorConfig:
    """One simulated motor: soft limits, speed, start position (the role's unit)."""

    low: float
    high: float
    velocity: float
    initial: float
    desc: str
    precision: int = 3


def default_motors(zp_z_nominal_um: float = 0.0, zp_z_range_um: float = 200.0,
                   energy_ev: float = 8000.0,
                   initial: Mapping[str, float] | None = None) -> dict[str, MotorConfig]:
    """Default motors of the simulated TXM, role → :class:`MotorConfig`.

    Parameters
    ----------
    zp_z_nominal_um : float
        Nominal zone-plate z (start position, centre of its travel), µm; the detector model
        puts the in-focus position at the reference energy at 0.
    zp_z_range_um : float
        Half travel of ZP z around the nominal, µm.
    energy_ev : float
        Start energy, eV (5000–14000).
    initial : mapping of str to float, optional
        Start positions that override the defaults, role → position (e.g. from the detector
        model's default state); each must lie within its motor's limits.
    """
    if not zp_z_range_um > 0:
        raise ValueError(f"zp_z_range_um must be > 0, got {zp_z_range_um}")
    if not 5000.0 <= energy_ev <= 14000.0:
        raise ValueError(f"energy_ev must be in 5000..14000 eV, got {energy_ev}")
    motors = _default_motors(zp_z_nominal_um, zp_z_range_um, energy_ev)
    for role, position in (initial or {}).items():
        if role not in motors:
            raise KeyError(f"initial: unknown motor role {role!r}; known: {sorted(motors)}")
        m = motors[role]
        if not m.low <= position <= m.high:
            raise ValueError(f"initial {role} = {position} is outside [{m.low}, {m.high}]")
        motors[role] = replace(m, initial=float(position))
    return motors


def _default_motors(z0: float, zp_z_range_um: float, energy_ev: float) -> dict[str, MotorConfig]:
    return {
        "zp_z_um": MotorConfig(z0 - zp_z_range_um, z0 + zp_z_range_um, 50.0, z0,
                               "zone plate z (focus)"),
        "zp_x_um": MotorConfig(-500.0, 500.0, 20.0, 0.0, "zone plate x"),
        "zp_y_um": MotorConfig(-500.0, 500.0, 20.0, 0.0, "zone plate y"),
        "sample_x_um": MotorConfig(-10000.0, 10000.0, 1000.0, 0.0, "sample x"),
        "sample_y_um": MotorConfig(-10000.0, 10000.0, 1000.0, 0.0, "sample y"),
        "sample_theta_deg": MotorConfig(-180.0, 180.0, 30.0, 0.0, "sample rotation"),
        "energy_ev": MotorConfig(5000.0, 14000.0, 2000.0, energy_ev, "photon energy", 1),
        "shaker_amp_um": MotorConfig(0.0, 100.0, 100.0, 10.0, "condenser shaker amplitude"),
        "shaker_freq_hz": MotorConfig(1.0, 500.0, 500.0, 40.0, "condenser shaker frequency"),
        "beam_x": MotorConfig(-1000.0, 1000.0, 100.0, 0.0, "beam steering x"),
        "beam_y": MotorConfig(-1000.0, 1000.0, 100.0, 0.0, "beam steering y"),
    }


@dataclass(frozen=True)
class SimIOCConfig:
    """Start-up state of the simulated IOC.

    Attributes
    ----------
    motors : mapping of str to MotorConfig
        Role → motor; every role needs a name in the IOC's role map.
    acquire : bool
        ``CAM:Acquire`` at start-up (True: the camera is acquiring).
    exposure_s : float
        ``CAM:AcquireTime``, s.
    frame_type : str
        ``CAM:FrameType``, one of :data:`FRAME_TYPES`.
    shutter_open : bool
        ``SHUTTER`` at start-up.
    ring_current_ma : float
        ``RING:CURRENT``, mA.
    tick_s : float
        Motor readback update period while moving, s.
    """

    motors: Mapping[str, MotorConfig] = field(default_factory=default_motors)
    acquire: bool = True
    exposure_s: float = 0.05
    frame_type: str = "Normal"
    shutter_open: bool = True
    ring_current_ma: float = 200.0
    tick_s: float = 0.02

    def __post_init__(self) -> None:
        if not self.exposure_s > 0:
            raise ValueError(f"exposure_s must be > 0, got {self.exposure_s}")
        if self.frame_type not in FRAME_TYPES:
            raise ValueError(f"frame_type {self.frame_type!r} is not one of {FRAME_TYPES}")
        if not self.ring_current_ma >= 0:
            raise ValueError(f"ring_current_ma must be >= 0, got {self.ring_current_ma}")
        if not self.tick_s > 0:
            raise ValueError(f"tick_s must be > 0, got {self.tick_s}")


def _pv(key: str, suffix: str, **kwargs: Any) -> pvproperty:
    return pvproperty(name=suffix, alarm_group=key, **kwargs)


def _truth(key: str, units: str, doc: str) -> pvproperty:
    return pvproperty(name=pvnames.TRUTH_PVS[key], value=math.nan, read_only=True, units=units,
                      precision=4, alarm_group=f"truth_{key}", doc=f"{doc} (simulation truth)")


class BeamlinePVs(PVGroup):
    """Camera, shutter, storage ring and truth PVs of the simulated beamline.

    Each PV has its own alarm (caproto shares one per group otherwise, so a refused put to
    one PV would put them all in alarm). Client puts are checked and mirrored into a
    lock-protected dict, which :meth:`state` copies for other threads.
    """

    acquire = _pv("acquire", pvnames.CAM_ACQUIRE, dtype=ChannelType.ENUM,
                  enum_strings=("Done", "Acquire"), value="Done", doc="camera acquiring")
    acquire_time = _pv("acquire_time", pvnames.CAM_ACQUIRE_TIME, value=0.05, units="s",
                       precision=4, doc="exposure time, s")
    frame_type = _pv("frame_type", pvnames.CAM_FRAME_TYPE, dtype=ChannelType.ENUM,
                     enum_strings=FRAME_TYPES, value="Normal", doc="areaDetector frame type")
    array_counter = _pv("array_counter", pvnames.CAM_ARRAY_COUNTER, value=0, read_only=True,
                        doc="frames published")
    shutter = _pv("shutter", pvnames.SHUTTER, dtype=ChannelType.ENUM,
                  enum_strings=("Closed", "Open"), value="Closed", doc="beam shutter")
    ring_current = _pv("ring_current", pvnames.RING_CURRENT, value=0.0, units="mA",
                       precision=2, doc="storage ring current, mA")
    truth_focus_z_um = _truth("focus_z_um", "um", "in-focus ZP z now")
    truth_beam_x_px = _truth("beam_x_px", "px", "illumination spot x offset from field centre")
    truth_beam_y_px = _truth("beam_y_px", "px", "illumination spot y offset from field centre")
    truth_uniformity_cv = _truth("uniformity_cv", "", "illumination coefficient of variation")
    truth_resolution_nm = _truth("resolution_nm", "nm", "half-period resolution of the optics")

    def __init__(self, prefix: str, config: SimIOCConfig, **kwargs: Any) -> None:
        super().__init__(prefix, **kwargs)
        self.config = config
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {
            "acquire": config.acquire,
            "exposure_s": config.exposure_s,
            "frame_type": config.frame_type,
            "shutter_open": config.shutter_open,
            "ring_current_ma": config.ring_current_ma,
        }
        self.initialized = threading.Event()

    def state(self) -> dict[str, Any]:
        """Copy of the camera/shutter/ring state (thread safe)."""
        with self._lock:
            return dict(self._state)

    def _mirror(self, key: str, value: Any) -> None:
        with self._lock:
            self._state[key] = value

    @acquire.startup
    async def acquire(self, instance: Any, async_lib: Any) -> None:
        c = self.config
        await self.acquire.write("Acquire" if c.acquire else "Done")
        await self.acquire_time.write(c.exposure_s)
        await self.frame_type.write(c.frame_type)
        await self.shutter.write("Open" if c.shutter_open else "Closed")
        await self.ring_current.write(c.ring_current_ma)
        self.initialized.set()

    @acquire.putter
    async def acquire(self, instance: Any, value: str) -> str:
        self._mirror("acquire", value == "Acquire")
        return value

    @acquire_time.putter
    async def acquire_time(self, instance: Any, value: float) -> float:
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"{instance.pvname}: exposure must be > 0 s, got {value}")
        self._mirror("exposure_s", float(value))
        return value

    @frame_type.putter
    async def frame_type(self, instance: Any, value: str) -> str:
        self._mirror("frame_type", value)
        return value

    @shutter.putter
    async def shutter(self, instance: Any, value: str) -> str:
        self._mirror("shutter_open", value == "Open")
        return value

    @ring_current.putter
    async def ring_current(self, instance: Any, value: float) -> float:
        if not value >= 0 or not math.isfinite(value):
            raise ValueError(f"{instance.pvname}: ring current must be >= 0 mA, got {value}")
        self._mirror("ring_current_ma", float(value))
        return value


class SimIOC:
    """The simulated beamline IOC, served on ``host:port`` from a background thread.

    Parameters
    ----------
    config : SimIOCConfig, optional
        Motors and start-up state; defaults when None.
    prefix : str
        PV prefix.
    port : int
        CA server port.
    host : str
        Interface to serve on (loopback by default).
    role_map : mapping of str to str, optional
        Role → motor record name under the prefix (:data:`hw.pvnames.MOTOR_ROLES` when None).
    """

    def __init__(self, config: SimIOCConfig | None = None, *,
                 prefix: str = pvnames.DEFAULT_SIM_PREFIX, port: int = 5064,
                 host: str = LOOPBACK, role_map: Mapping[str, str] | None = None) -> None:
        self.config = config or SimIOCConfig()
        self.prefix = prefix
        names = pvnames.motor_pvs(prefix, role_map)
        missing = sorted(set(self.config.motors) - set(names))
        if missing:
            raise ValueError(f"motors {missing} have no PV name in the role map")
        self.motor_pvs = {role: names[role] for role in self.config.motors}
        self.motors: dict[str, MotorRecord] = {
            role: MotorRecord(self.motor_pvs[role], velocity=m.velocity, low_limit=m.low,
                              high_limit=m.high, initial=m.initial,
                              egu=pvnames.MOTOR_UNITS.get(role, ""), desc=m.desc,
                              precision=m.precision, tick_s=self.config.tick_s)
            for role, m in self.config.motors.items()
        }
        self.beamline = BeamlinePVs(prefix, self.config)
        pvdb: dict[str, Any] = {}
        for group in (*self.motors.values(), self.beamline):
            clash = set(pvdb) & set(group.pvdb)
            if clash:
                raise ValueError(f"PV names used twice: {sorted(clash)}")
            pvdb.update(group.pvdb)
        self.pvdb = pvdb
        self.server = CaServerThread(pvdb, port, host, name=f"sim-ioc:{port}")

    @property
    def port(self) -> int:
        return self.server.port

    def pv(self, suffix: str) -> str:
        """Full name of one of this IOC's non-motor PVs (a :mod:`hw.pvnames` suffix)."""
        return pvnames.pv(self.prefix, suffix)

    # -- life cycle ------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Serve; returns when every record has its start-up values."""
        self.server.start(timeout)
        deadline = time.monotonic() + timeout
        for group in (*self.motors.values(), self.beamline):
            if not group.initialized.wait(max(deadline - time.monotonic(), 0.0)):
                self.stop()
                raise TimeoutError(f"{group.prefix} did not initialize within {timeout} s")

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> SimIOC:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reads for the frame generator (any thread) ------------------------------------------
    def positions(self, t: float | None = None) -> dict[str, float]:
        """Role → position at monotonic time ``t`` (now when None), in the role's unit."""
        t = time.monotonic() if t is None else t
        return {role: motor.position(t) for role, motor in self.motors.items()}

    def snapshot(self) -> dict[str, Any]:
        """The IOC's state at one instant, for the frame generator.

        Returns
        -------
        dict
            ``t_monotonic`` (s), ``positions`` (role → position, e.g. ``zp_z_um``: use as a
            frame's ``positions``), ``moving`` (role → bool), ``acquire`` (bool),
            ``exposure_s`` (``CAM:AcquireTime``), ``frame_type``
            (``Normal``/``Background``/``FlatField``), ``shutter_open`` (bool),
            ``ring_current_ma``. The positions and the last four are the fields of
            :class:`hw.sim.detector.BeamlineState` of the same names.
        """
        t = time.monotonic()
        out: dict[str, Any] = {
            "t_monotonic": t,
            "positions": self.positions(t),
            "moving": {role: motor.moving for role, motor in self.motors.items()},
        }
        out.update(self.beamline.state())
        return out

    def moved_between(self, t0: float, t1: float, roles: Iterable[str] | None = None) -> bool:
        """True if any motor of ``roles`` (all when None) moved in ``[t0, t1]`` (monotonic s)."""
        roles = self.motors if roles is None else list(roles)
        unknown = sorted(set(roles) - set(self.motors))
        if unknown:
            raise KeyError(f"unknown motor roles {unknown}; known: {sorted(self.motors)}")
        return any(self.motors[role].moved_between(t0, t1) for role in roles)

    # -- writes from the frame generator (any thread, never blocks) -------------------------
    def set_truth(self, **values: float) -> None:
        """Publish simulation truth: keywords among ``focus_z_um``, ``beam_x_px``,
        ``beam_y_px``, ``uniformity_cv``, ``resolution_nm``."""
        unknown = sorted(set(values) - set(pvnames.TRUTH_PVS))
        if unknown:
            raise KeyError(f"unknown truth keys {unknown}; known: {sorted(pvnames.TRUTH_PVS)}")
        self.server.post({self.pv(pvnames.TRUTH_PVS[k]): float(v) for k, v in values.items()})

    def set_array_counter(self, count: int) -> None:
        """Publish ``CAM:ArrayCounter_RBV`` (frames sent so far)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"array counter must be an int >= 0, got {count!r}")
        self.server.post({self.pv(pvnames.CAM_ARRAY_COUNTER): count})

    def set_ring_current(self, current_ma: float) -> None:
        """Set ``RING:CURRENT`` from the simulation (a beam loss or a top-up), mA."""
        if not current_ma >= 0 or not math.isfinite(current_ma):
            raise ValueError(f"ring current must be >= 0 mA, got {current_ma}")
        self.beamline._mirror("ring_current_ma", float(current_ma))
        self.server.post({self.pv(pvnames.RING_CURRENT): float(current_ma)})
