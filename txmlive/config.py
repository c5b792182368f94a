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
    centroid_fraction: float = _opt(
        0.9,
        "beam centroid background as a fraction of the binned frame's maximum, [0, 1): 0 = "
        "centre of mass of the whole field; 0.9 follows the brightest part of the "
        "illumination, which still moves with the beam once the shaker has flattened the "
        "field", min_value=0)


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
    beam_jump_px: float = _opt(20.0, "size of the beam spot's sudden jumps, px", min_value=0)
    beam_jump_interval_s: float = _opt(600.0, "mean interval between beam jumps (as after a "
                                              "top-up injection), s; 0 = no jumps",
                                       min_value=0)
    vibration_nm: float = _opt(0.0, "random image vibration, nm RMS", min_value=0)
    seed: int = _opt(0, "random seed")


@dataclass
class Feedback:
    """Feedback procedures and loops (autofocus, energy scan, shaker tuning, beam position)."""

    dry_run: bool = _opt(False, "compute and log every move without putting it")
    max_step: dict[str, float] = _opt(
        {"zp_z_um": 200.0, "energy_ev": 50.0, "shaker_amp_um": 20.0, "shaker_freq_hz": 100.0,
         "beam_x": 2.5, "beam_y": 2.5},
        "largest step of one move per motor role, in the role's unit (a role not listed is "
        "never moved)")
    tolerance: dict[str, float] = _opt(
        {"zp_z_um": 0.1, "energy_ev": 0.1, "shaker_amp_um": 0.05, "shaker_freq_hz": 0.01,
         "beam_x": 0.01, "beam_y": 0.01},
        "readback tolerance per role: a move is done, and a frame taken at the commanded "
        "position, within it")
    soft_limits: dict[str, list[float]] = _opt(
        {}, "[low, high] per role, within the motor record's own .LLM/.HLM (a role not "
            "listed: the record's limits)")
    acquire_timeout_s: float = _opt(10.0, "longest wait for the frames of one acquisition, s",
                                    min_value=0.1)
    stale_after_s: float = _opt(2.0, "the results stream is stale after this long without a "
                                     "result, s", min_value=0.1)
    move_settle_s: float = _opt(5.0, "time a move may take beyond distance / velocity, s",
                                min_value=0.1)
    min_mean_counts: float = _opt(
        0.0, "frames at or below this mean count are beam loss (set it above the camera's "
             "dark level)")
    zp_diameter_um: float = _opt(125.0, "zone-plate diameter, um", min_value=1e-3)
    zp_dr_nm: float = _opt(25.0, "zone-plate outermost zone width, nm", min_value=1e-3)
    sample_detector_mm: float = _opt(700.0, "sample-detector distance, mm", min_value=1e-3)
    af_score: str = _opt("band_power", "autofocus score (a metric, larger is sharper)",
                         choices=("band_power", "cutoff_per_um", "normalized_variance",
                                  "brenner", "tenengrad", "vollath_f4"))
    af_half_range_dof: float = _opt(3.0, "autofocus coarse range, +- this many depths of focus",
                                    min_value=0.1)
    af_coarse_points: int = _opt(7, "autofocus coarse positions", min_value=5)
    af_refine_points: int = _opt(5, "autofocus refinement positions", min_value=3)
    af_frames_per_point: int = _opt(1, "frames per coarse position", min_value=1)
    af_max_frames_per_point: int = _opt(8, "most frames per position at low dose",
                                        min_value=1)
    af_backlash_um: float = _opt(0.0, "approach every sweep from this far below, um (0 = off)",
                                 min_value=0)
    focus_model: str = _opt("thin_lens", "ZP focus vs energy model of the energy scan",
                            choices=("thin_lens", "linear"))
    focus_points: list[float] = _opt(
        [], "in-focus points as flat pairs [E1_ev, z1_um, E2_ev, z2_um, ...]; fewer than two: "
            "the nominal thin lens through the scan's start, confirmed by a refocus there")
    scan_frames_per_step: int = _opt(1, "frames whose focus score is checked per energy step",
                                     min_value=1)
    scan_drop_fraction: float = _opt(0.3, "refocus when the score drops by this fraction",
                                     min_value=0.01)
    shaker_target_cv: float = _opt(0.02, "flat-field uniformity target (coefficient of "
                                         "variation)", min_value=1e-4)
    shaker_amplitudes: int = _opt(12, "amplitudes in the shaker's upward scan", min_value=3)
    shaker_amp_range_um: list[float] = _opt(
        [], "[low, high] shaker amplitudes scanned, um; [] = the amplitude's soft limits")
    shaker_flat_frames: int = _opt(2, "flat frames averaged per amplitude", min_value=1)
    shaker_measure_na_fill: bool = _opt(True, "also judge the NA fill (needs [metrics] dr_nm)")
    beam_response: list[float] = _opt(
        [], "steering response [dx/dux, dx/duy, dy/dux, dy/duy], px per motor unit; [] = "
            "calibrate when the beam loop is enabled")
    beam_response_pixel_nm: float = _opt(0.0, "pixel size of beam_response, nm (0 = never "
                                              "rescaled with energy)", min_value=0)
    beam_setpoints: list[float] = _opt(
        [], "centroid setpoints as flat triples [E_ev, x_px, y_px, ...] in full-frame px (as "
            "BEAM:X_PX); [] = hold the centroid found when the loop is enabled")
    beam_integral_gain: float = _opt(0.7, "beam loop integral gain (0 < Ki <= 1)",
                                     min_value=1e-3)
    beam_proportional_gain: float = _opt(0.1, "beam loop proportional gain", min_value=0)
    beam_deadband_px: float = _opt(0.3, "no steering while the centroid error is below this, "
                                        "px", min_value=0)
    beam_calibration_step: float = _opt(3.0, "steering step of the response calibration, "
                                             "motor units", min_value=1e-6)
    beam_calibration_frames: int = _opt(3, "frames per calibration point", min_value=1)


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
    feedback: Feedback = field(default_factory=Feedback)


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
