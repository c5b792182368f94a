"""Configuration: one TOML file with typed sections, validated once at start-up.

The dataclasses below are the single home of every setting, its type, default and comment;
``txmlive config --default`` renders them as a commented TOML file, and :func:`load_config`
overlays a user's file on them, rejecting an unknown section or key, or a value of the wrong
type, with an error that names it (``ConfigError: [ingest] queue_frames: ...``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from hw.pvnames import MOTOR_ROLES


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the bad key."""


def _opt(default: Any, doc: str, choices: tuple[str, ...] | None = None,
         min_value: float | None = None) -> Any:
    meta = {"doc": doc, "choices": choices, "min": min_value}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Endpoints:
    """ZMQ endpoints the commands use to find each other."""

    frames: str = _opt("tcp://127.0.0.1:5555",
                       "frames: detector/sim/replay bind PUSH here; `txmlive run` connects PULL")
    results: str = _opt("tcp://127.0.0.1:5556",
                        "results: `txmlive run` binds PUB, one message per processed frame")
    preview: str = _opt("tcp://127.0.0.1:5557",
                        "preview: `txmlive run` binds PUB, keep-latest binned images")


@dataclass
class Ingest:
    """Receiving frames."""

    socket: str = _opt("pull", "socket type for frames: pull (lossless) or sub (tap a PUB)",
                       choices=("pull", "sub"))
    max_payload_mb: float = _opt(256.0, "largest accepted frame payload, MiB", min_value=0)
    rcvhwm: int = _opt(64, "ZMQ receive high-water mark, messages", min_value=1)
    queue_frames: int = _opt(16, "bounded queue between receiver and processing, frames",
                             min_value=1)
    queue_policy: str = _opt(
        "block",
        "when the processing queue is full: block (backpressure to the sender, lossless) or "
        "drop-oldest (freshest data first; drops are counted)",
        choices=("block", "drop-oldest"))


@dataclass
class Correction:
    """Dark/flat correction (raw - dark) / (flat - dark)."""

    enabled: bool = _opt(True, "correct data frames with the matching dark/flat references")
    reference_frames: int = _opt(10, "references are the mean of the last N dark/flat frames",
                                 min_value=1)
    min_denominator: float = _opt(
        1.0, "pixels whose flat - dark is below this (counts) are dead: corrected value NaN",
        min_value=0)


@dataclass
class Averaging:
    """Vibration averaging of consecutive data frames."""

    frames: int = _opt(1, "block average of N consecutive data frames (1 = off)", min_value=1)


@dataclass
class Metrics:
    """On-the-fly metrics (PSD resolution, focus scores, beam, vibration)."""

    roi: list[int] = _opt([], "metrics ROI [row, col, height, width] in full-frame px; [] = "
                              "the central 512 x 512")
    pixel_nm: float = _opt(10.0, "pixel size at the sample, nm, when a frame has no "
                                 "attrs.pixel_nm", min_value=0)
    dr_nm: float = _opt(0.0, "zone-plate outermost zone width, nm, for the NA-fill estimate "
                             "(0 = not reported)", min_value=0)
    band_per_um: list[float] = _opt([5.0, 15.0], "[lo, hi] band of the PSD band power, 1/um")
    threshold: float = _opt(2.0, "PSD cut-off where the smoothed PSD falls to threshold x the "
                                 "noise floor", min_value=1)
    bin_factor: int = _opt(8, "binning of the full frame for centroid and uniformity",
                           min_value=1)


@dataclass
class Preview:
    """The keep-latest preview stream for viewers."""

    bin: int = _opt(4, "binning factor of preview images", min_value=1)
    max_rate_hz: float = _opt(10.0, "at most this many previews per second", min_value=0)


@dataclass
class Recorder:
    """HDF5 recording (never drops)."""

    flush_interval_s: float = _opt(1.0, "flush the HDF5 file at least this often, s",
                                   min_value=0)
    warn_backlog_frames: int = _opt(
        64, "warn loudly when this many frames wait to be written", min_value=1)


@dataclass
class Status:
    """Live status reporting."""

    interval_s: float = _opt(1.0, "status line period, s", min_value=0.05)


@dataclass
class Epics:
    """EPICS servers and prefixes."""

    beamline_prefix: str = _opt(
        "TXMSIM:", "PV prefix of the beamline's motors and camera: `txmlive sim` serves it, "
                   "the feedback drives it (a real beamline: often empty, full names in "
                   "[motors])")
    beamline_ca_port: int = _opt(5064, "CA server port of the beamline IOC (`txmlive sim` "
                                       "serves on it)", min_value=1)
    beamline_ca_addr: list[str] = _opt(
        [], "extra CA server addresses (host or host:port) of a real beamline's IOCs")
    pv_server: bool = _opt(True, "`txmlive run` serves its metrics, status and loop controls")
    pv_prefix: str = _opt("TXM:LIVE:", "PV prefix of the pipeline's PV server")
    pv_ca_port: int = _opt(5066, "CA server port of the pipeline's PV server", min_value=1)
    pv_max_rate_hz: float = _opt(10.0, "the PV server posts the newest result at most this "
                                       "often", min_value=0.1)


@dataclass
class Sim:
    """The simulated beamline (`txmlive sim`)."""

    size: int = _opt(1024, "detector size N (N x N uint16)", min_value=16)
    fps: float = _opt(10.0, "frame rate, frames/s", min_value=0.1)
    energy_ev: float = _opt(8000.0, "start energy, eV", min_value=5000)
    sample: str = _opt("siemens", "sample", choices=("siemens", "battery", "blank", "weak_phase"))
    focus_offset_um: float = _opt(0.0, "hidden offset of the true focus from nominal, um")
    beam_drift_px_per_s: float = _opt(0.0, "drift of the beam spot, px/s", min_value=0)
    vibration_nm: float = _opt(0.0, "random image vibration, nm RMS", min_value=0)
    seed: int = _opt(0, "random seed")


@dataclass
class Config:
    """The whole configuration, one attribute per TOML section."""

    endpoints: Endpoints = field(default_factory=Endpoints)
    ingest: Ingest = field(default_factory=Ingest)
    correction: Correction = field(default_factory=Correction)
    averaging: Averaging = field(default_factory=Averaging)
    metrics: Metrics = field(default_factory=Metrics)
    preview: Preview = field(default_factory=Preview)
    recorder: Recorder = field(default_factory=Recorder)
    status: Status = field(default_factory=Status)
    epics: Epics = field(default_factory=Epics)
    motors: dict[str, str] = field(default_factory=lambda: dict(MOTOR_ROLES))
    sim: Sim = field(default_factory=Sim)


def _check_value(section: str, f: dataclasses.Field, typ: Any, value: Any) -> Any:
    where = f"[{section}] {f.name}"
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    origin = getattr(typ, "__origin__", None)
    if origin is list:
        (item,) = typ.__args__
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        value = [float(v) if item is float and isinstance(v, int) and not isinstance(v, bool)
                 else v for v in value]
        if not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: expected a list of {item.__name__}, got {value!r}")
    if typ in (int, float, str, bool):
        if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
    low = f.metadata.get("min")
    if low is not None and not isinstance(value, list) and value < low:
        raise ConfigError(f"{where}: {value!r} is below the minimum {low}")
    return value


def config_from_dict(data: dict[str, Any]) -> Config:
    """Overlay a parsed TOML mapping on the defaults, validating every key."""
    config = Config()
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for name, values in data.items():
        if name not in sections:
            raise ConfigError(f"unknown section [{name}]; known: {sorted(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table, got {values!r}")
        current = getattr(config, name)
        if isinstance(current, dict):  # [motors]: role -> record name
            for role, record in values.items():
                if role not in MOTOR_ROLES:
                    raise ConfigError(f"[{name}] unknown motor role {role!r}; known: "
                                      f"{sorted(MOTOR_ROLES)}")
                if not isinstance(record, str) or not record:
                    raise ConfigError(f"[{name}] {role}: expected a record name, got {record!r}")
                current[role] = record
            continue
        hints = get_type_hints(type(current))
        keys = {f.name: f for f in dataclasses.fields(current)}
        for key, value in values.items():
            if key not in keys:
                raise ConfigError(f"[{name}] unknown key {key!r}; known: {sorted(keys)}")
            setattr(current, key, _check_value(name, keys[key], hints[key], value))
    return config


def load_config(path: str | Path | None = None) -> Config:
    """The configuration from a TOML file, or the defaults when ``path`` is None."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return config_from_dict(data)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def render_config(config: Config | None = None) -> str:
    """A complete, commented TOML rendering of ``config`` (the defaults when None)."""
    config = config or Config()
    lines = ["# txmlive configuration. Every key is optional; these are the defaults.", ""]
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if isinstance(value, dict):
            lines.append("# Motor role -> motor record name under [epics] beamline_prefix (a real "
                         "beamline: its record names).")
            lines.append(f"[{section.name}]")
            lines.extend(f"{role} = {_toml_value(record)}" for role, record in value.items())
            lines.append("")
            continue
        lines.append(f"# {type(value).__doc__.strip()}")
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(value):
            doc = f.metadata.get("doc", "")
            choices = f.metadata.get("choices")
            if choices:
                doc += f" (one of: {', '.join(choices)})"
            lines.append(f"# {doc}")
            lines.append(f"{f.name} = {_toml_value(getattr(value, f.name))}")
        lines.append("")
    return "\n".join(lines)
