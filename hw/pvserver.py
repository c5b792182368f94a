"""The pipeline's PV server: newest metrics, status counters and feedback control records.

:class:`PvServer` serves a caproto :class:`LivePVs` group under a prefix (default
``TXM:LIVE:``) on its own CA port, from a background thread:

- metrics of the newest Result: ``RESOLUTION_NM``, ``CUTOFF_PER_UM``, ``BAND_POWER``,
  ``BEAM:X_PX``, ``BEAM:Y_PX``, ``UNIFORMITY_CV``, ``VIBRATION_NM`` and its ``SEQ``; a metric
  the Result lacks (or that is None/NaN) reads NaN with INVALID severity;
- status: ``FPS``, ``LATENCY_P99_MS``, ``RECEIVED``, ``PROCESSED``, ``DROPPED``, ``REJECTED``,
  ``GAPS``;
- control records clients put to: ``AF:START``, ``AF:ABORT``, ``SHAKER:TUNE`` (put 1; they
  read 0 again), ``BEAMFB:ENABLE`` (Off/On), ``BEAMFB:SETPOINT_X_PX``,
  ``BEAMFB:SETPOINT_Y_PX``;
- state records the feedback side reports through :meth:`PvServer.set_state`: ``AF:STATE``,
  ``AF:VERDICT``, ``AF:BEST_Z_UM``, ``BEAMFB:STATE``, ``BEAMFB:ERROR_PX``, ``SHAKER:VERDICT``.

Data flow: :meth:`PvServer.update` (any thread, e.g. the pipeline's ``on_result``) only stores
a reference to the newest Result; the server's own task publishes the newest one at most
``max_rate_hz`` times a second, so the hot path never waits on Channel Access. ``SEQ`` is
written after the other values of its Result, so a client that sees a new ``SEQ`` reads that
Result's metrics and counters (or newer ones). A client put
to a control record only becomes a :class:`PvCommand` on :attr:`PvServer.commands` (a
``queue.Queue``) for the executor; nothing is acted on inside the put handler.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, pvproperty

from hw import pvnames
from hw.epics_env import LOOPBACK, CaServerThread

_METRIC_UNITS = {"resolution_nm": "nm", "cutoff_per_um": "1/um", "centroid_x_px": "px",
                 "centroid_y_px": "px", "vibration_nm": "nm"}


@dataclass(frozen=True)
class PvCommand:
    """A client's put to a control record, for the executor.

    Attributes
    ----------
    name : str
        Key of :data:`hw.pvnames.LIVE_COMMAND_PVS` (``af_start``, ``beamfb_enable`` ...).
    value : bool or float
        True for the one-shot triggers and the enable; the setpoint in px otherwise.
    t_ns : int
        ``time.time_ns()`` of the put.
    """

    name: str
    value: bool | float
    t_ns: int


def _finite_or_none(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def result_values(result: Mapping[str, Any]) -> dict[str, float | int | None]:
    """PV suffix → value for one Result (None: the metric is missing or not finite).

    Parameters
    ----------
    result : mapping
        A pipeline Result: ``seq``, ``metrics`` (``resolution_nm`` ...), ``counters``
        (``received``, ``processed``, ``dropped``, ``rejected_total``, ``gaps``). Counters the
        Result lacks are left out (their PVs keep their values).
    """
    if not isinstance(result, Mapping):
        raise TypeError(f"a Result must be a mapping, got {type(result).__name__}")
    metrics = result.get("metrics") or {}
    counters = result.get("counters") or {}
    out: dict[str, float | int | None] = {
        suffix: _finite_or_none(metrics.get(key)) for key, suffix in pvnames.LIVE_METRIC_PVS.items()
    }
    for key, suffix in pvnames.LIVE_COUNTER_PVS.items():
        if counters.get(key) is not None:
            out[suffix] = int(counters[key])
    if result.get("seq") is not None:
        out[pvnames.LIVE_SEQ] = int(result["seq"])  # last: see PvServer's docstring
    return out


def status_values(status: Mapping[str, Any]) -> dict[str, float | None]:
    """PV suffix → value for a pipeline status (``fps_now`` or ``fps``, ``latency_ms.p99``)."""
    if not isinstance(status, Mapping):
        raise TypeError(f"a status must be a mapping, got {type(status).__name__}")
    fps = status.get("fps_now", status.get("fps"))
    latency = status.get("latency_ms") or {}
    out = {pvnames.LIVE_FPS: _finite_or_none(fps),
           pvnames.LIVE_LATENCY_P99: _finite_or_none(latency.get("p99"))}
    counters = status.get("counters")
    if counters:
        for key, suffix in pvnames.LIVE_COUNTER_PVS.items():
            if counters.get(key) is not None:
                out[suffix] = int(counters[key])
    return out


def _metric(key: str, doc: str) -> pvproperty:
    # its own alarm group: caproto PVs of a group share one alarm unless told otherwise, and
    # a missing metric must mark only its own PV INVALID
    return pvproperty(name=pvnames.LIVE_METRIC_PVS[key], value=math.nan, read_only=True,
                      precision=3, units=_METRIC_UNITS.get(key, ""), alarm_group=key, doc=doc)


def _counter(key: str, doc: str) -> pvproperty:
    return pvproperty(name=pvnames.LIVE_COUNTER_PVS[key], value=0, read_only=True,
                      alarm_group=key, doc=doc)


def _trigger(key: str, doc: str) -> pvproperty:
    return pvproperty(name=pvnames.LIVE_COMMAND_PVS[key], value=0, alarm_group=key, doc=doc)


def _state_string(key: str, value: str, doc: str) -> pvproperty:
    return pvproperty(name=pvnames.LIVE_STATE_PVS[key], value=value, dtype=ChannelType.STRING,
                      read_only=True, alarm_group=key, doc=doc)


class LivePVs(PVGroup):
    """The PV server's records; see the module docstring. Commands go to ``commands``."""

    seq = pvproperty(name=pvnames.LIVE_SEQ, value=0, read_only=True, alarm_group="seq",
                     doc="seq of the Result the metrics come from")
    resolution_nm = _metric("resolution_nm", "half-period resolution 1/(2 f_c), nm")
    cutoff_per_um = _metric("cutoff_per_um", "PSD cut-off frequency f_c, 1/um")
    band_power = _metric("band_power", "PSD power in the focus band")
    centroid_x_px = _metric("centroid_x_px", "beam centroid x offset from field centre, px")
    centroid_y_px = _metric("centroid_y_px", "beam centroid y offset from field centre, px")
    uniformity_cv = _metric("uniformity_cv", "illumination coefficient of variation")
    vibration_nm = _metric("vibration_nm", "frame-to-frame image motion, nm RMS")

    fps = pvproperty(name=pvnames.LIVE_FPS, value=0.0, read_only=True, precision=1,
                     units="Hz", alarm_group="fps", doc="processed frames per second")
    latency_p99_ms = pvproperty(name=pvnames.LIVE_LATENCY_P99, value=math.nan, read_only=True,
                                precision=2, units="ms", alarm_group="latency",
                                doc="99th percentile latency, ms")
    received = _counter("received", "frames received")
    processed = _counter("processed", "frames processed")
    dropped = _counter("dropped", "frames dropped by the bounded queue")
    rejected = _counter("rejected_total", "messages rejected as invalid")
    gaps = _counter("gaps", "missing sequence numbers")

    af_start = _trigger("af_start", "put 1 to start an autofocus")
    af_abort = _trigger("af_abort", "put 1 to abort the autofocus")
    shaker_tune = _trigger("shaker_tune", "put 1 to start shaker tuning")
    beamfb_enable = pvproperty(name=pvnames.LIVE_COMMAND_PVS["beamfb_enable"],
                               dtype=ChannelType.ENUM, enum_strings=("Off", "On"), value="Off",
                               alarm_group="beamfb_enable", doc="beam position feedback enable")
    beamfb_setpoint_x_px = pvproperty(name=pvnames.LIVE_COMMAND_PVS["beamfb_setpoint_x_px"],
                                      value=0.0, precision=2, units="px",
                                      alarm_group="beamfb_setpoint_x_px",
                                      doc="beam position setpoint x, px from field centre")
    beamfb_setpoint_y_px = pvproperty(name=pvnames.LIVE_COMMAND_PVS["beamfb_setpoint_y_px"],
                                      value=0.0, precision=2, units="px",
                                      alarm_group="beamfb_setpoint_y_px",
                                      doc="beam position setpoint y, px from field centre")

    af_state = _state_string("af_state", "idle", "autofocus state")
    af_verdict = _state_string("af_verdict", "", "verdict of the last autofocus")
    af_best_z_um = pvproperty(name=pvnames.LIVE_STATE_PVS["af_best_z_um"], value=math.nan,
                              read_only=True, precision=3, units="um",
                              alarm_group="af_best_z_um", doc="best ZP z of the last autofocus, um")
    beamfb_state = _state_string("beamfb_state", "idle", "beam feedback state")
    beamfb_error_px = pvproperty(name=pvnames.LIVE_STATE_PVS["beamfb_error_px"],
                                 value=math.nan, read_only=True, precision=2, units="px",
                                 alarm_group="beamfb_error_px", doc="beam position error, px")
    shaker_verdict = _state_string("shaker_verdict", "", "verdict of the last shaker tuning")

    def __init__(self, prefix: str, *, commands: queue.Queue, max_rate_hz: float,
                 **kwargs: Any) -> None:
        super().__init__(prefix, **kwargs)
        self.commands = commands
        self.period_s = 1.0 / max_rate_hz
        self._lock = threading.Lock()
        self._result: Mapping[str, Any] | None = None
        self._status: Mapping[str, Any] | None = None
        self._controls: dict[str, Any] = {"beamfb_enable": False, "beamfb_setpoint_x_px": 0.0,
                                          "beamfb_setpoint_y_px": 0.0}
        self.published = 0
        self.by_suffix = {name[len(prefix):]: channel for name, channel in self.pvdb.items()}

    # -- keep-latest handoff (any thread) ----------------------------------------------------
    def offer(self, result: Mapping[str, Any] | None = None,
              status: Mapping[str, Any] | None = None) -> None:
        with self._lock:
            if result is not None:
                self._result = result
            if status is not None:
                self._status = status

    def controls(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._controls)

    # -- publishing (server loop) ------------------------------------------------------------
    async def _write(self, suffix: str, value: float | int | None) -> None:
        channel = self.by_suffix[suffix]
        if value is None:
            await channel.write(math.nan, status=AlarmStatus.UDF,
                                severity=AlarmSeverity.INVALID_ALARM)
        elif channel.severity != AlarmSeverity.NO_ALARM:
            await channel.write(value, status=AlarmStatus.NO_ALARM,
                                severity=AlarmSeverity.NO_ALARM)
        else:
            await channel.write(value)

    async def _publish_newest(self) -> None:
        with self._lock:
            result, status = self._result, self._status
            self._result = self._status = None
        values: dict[str, float | int | None] = {}
        if status is not None:
            values.update(status_values(status))
        if result is not None:
            # a Result's counters are the newer ones; its SEQ is written last
            for suffix, value in result_values(result).items():
                values.pop(suffix, None)
                values[suffix] = value
        for suffix, value in values.items():
            await self._write(suffix, value)
        if values:
            self.published += 1

    @seq.startup
    async def seq(self, instance: Any, async_lib: Any) -> None:
        while True:
            t0 = time.monotonic()
            try:
                await self._publish_newest()
            except Exception:  # noqa: BLE001 - a bad Result must not end publishing
                self.log.exception("publishing the newest result failed")
            await asyncio.sleep(max(self.period_s - (time.monotonic() - t0), 0.0))

    # -- control puts: hand to the executor, never act here ----------------------------------
    async def _command(self, instance: Any, name: str, value: bool | float) -> None:
        """Queue a command. A full queue fails the put: caproto then puts the record in a
        MAJOR/WRITE alarm, which the next accepted command clears."""
        try:
            self.commands.put_nowait(PvCommand(name, value, time.time_ns()))
        except queue.Full:
            raise RuntimeError(f"{name}: the command queue is full (is the executor "
                               "running?); command refused") from None
        if instance.severity != AlarmSeverity.NO_ALARM:
            await instance.alarm.write(status=AlarmStatus.NO_ALARM,
                                       severity=AlarmSeverity.NO_ALARM)

    @af_start.putter
    async def af_start(self, instance: Any, value: int) -> int:
        if value:
            await self._command(instance, "af_start", True)
        return 0

    @af_abort.putter
    async def af_abort(self, instance: Any, value: int) -> int:
        if value:
            await self._command(instance, "af_abort", True)
        return 0

    @shaker_tune.putter
    async def shaker_tune(self, instance: Any, value: int) -> int:
        if value:
            await self._command(instance, "shaker_tune", True)
        return 0

    @beamfb_enable.putter
    async def beamfb_enable(self, instance: Any, value: str) -> str:
        await self._command(instance, "beamfb_enable", value == "On")
        with self._lock:
            self._controls["beamfb_enable"] = value == "On"
        return value

    async def _setpoint(self, instance: Any, key: str, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"{key}: setpoint must be finite, got {value}")
        await self._command(instance, key, float(value))
        with self._lock:
            self._controls[key] = float(value)
        return value

    @beamfb_setpoint_x_px.putter
    async def beamfb_setpoint_x_px(self, instance: Any, value: float) -> float:
        return await self._setpoint(instance, "beamfb_setpoint_x_px", value)

    @beamfb_setpoint_y_px.putter
    async def beamfb_setpoint_y_px(self, instance: Any, value: float) -> float:
        return await self._setpoint(instance, "beamfb_setpoint_y_px", value)


class PvServer:
    """The pipeline's PV server on ``host:port``, in a background thread.

    Parameters
    ----------
    prefix : str
        PV prefix.
    port : int
        CA server port.
    host : str
        Interface to serve on (loopback by default).
    max_rate_hz : float
        At most this many metric/status publications per second.
    commands : queue.Queue, optional
        Where control puts go as :class:`PvCommand`; a new bounded queue when None.
    command_queue_size : int
        Size of that new queue; a put that finds it full fails (the client sees an error).
    """

    def __init__(self, prefix: str = pvnames.DEFAULT_LIVE_PREFIX, port: int = 5066,
                 host: str = LOOPBACK, *, max_rate_hz: float = 10.0,
                 commands: queue.Queue | None = None, command_queue_size: int = 64) -> None:
        if not max_rate_hz > 0 or not math.isfinite(max_rate_hz):
            raise ValueError(f"max_rate_hz must be > 0, got {max_rate_hz}")
        if command_queue_size < 1:
            raise ValueError(f"command_queue_size must be >= 1, got {command_queue_size}")
        self.prefix = prefix
        self.commands: queue.Queue = (commands if commands is not None
                                      else queue.Queue(maxsize=command_queue_size))
        self.group = LivePVs(prefix, commands=self.commands, max_rate_hz=max_rate_hz)
        self.server = CaServerThread(self.group.pvdb, port, host, name=f"pv-server:{port}")

    @property
    def port(self) -> int:
        return self.server.port

    def pv(self, suffix: str) -> str:
        """Full name of one of this server's PVs (a :mod:`hw.pvnames` suffix)."""
        return pvnames.pv(self.prefix, suffix)

    def start(self, timeout: float = 10.0) -> None:
        self.server.start(timeout)

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> PvServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def update(self, result: Mapping[str, Any]) -> None:
        """Hand over the newest Result (any thread; O(1), never blocks on CA).

        Only a reference is kept, so the caller must not mutate the dict afterwards.
        """
        if not isinstance(result, Mapping):
            raise TypeError(f"a Result must be a mapping, got {type(result).__name__}")
        self.group.offer(result=result)

    def update_status(self, status: Mapping[str, Any]) -> None:
        """Hand over the newest pipeline status (``fps``/``fps_now``, ``latency_ms``)."""
        if not isinstance(status, Mapping):
            raise TypeError(f"a status must be a mapping, got {type(status).__name__}")
        self.group.offer(status=status)

    def set_state(self, **values: str | float | bool) -> None:
        """Report feedback state (any thread, keep-latest): keywords from
        :data:`hw.pvnames.LIVE_STATE_PVS` (``af_state="running"``, ``af_best_z_um=3.2`` ...),
        ``beamfb_enable`` to switch the loop's enable off/on from the server side, or
        ``beamfb_setpoint_x_px``/``_y_px`` to show the setpoints the loop holds (these writes
        make no command)."""
        controls = ("beamfb_enable", "beamfb_setpoint_x_px", "beamfb_setpoint_y_px")
        known = {**pvnames.LIVE_STATE_PVS,
                 **{key: pvnames.LIVE_COMMAND_PVS[key] for key in controls}}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise KeyError(f"unknown state keys {unknown}; known: {sorted(known)}")
        writes: dict[str, Any] = {}
        for key, value in values.items():
            if key == "beamfb_enable":
                with self.group._lock:
                    self.group._controls["beamfb_enable"] = bool(value)
                value = "On" if value else "Off"
            elif key in controls:
                value = float(value)
                with self.group._lock:
                    self.group._controls[key] = value
            elif isinstance(value, str) and len(value.encode()) > 39:
                raise ValueError(f"{key}: {value!r} is longer than a CA string (39 bytes)")
            writes[self.pv(known[key])] = value
        self.server.post(writes)

    def controls(self) -> dict[str, Any]:
        """Current control values (``beamfb_enable``, setpoints), thread safe."""
        return self.group.controls()
