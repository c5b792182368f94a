"""PV names: a prefix plus a role map, and the one home of every PV-name suffix.

Every EPICS name txmlive serves or talks to is built here from a prefix (from the config) and
a suffix defined below, so pointing the same code at a real beamline is a matter of changing
the prefix and the motor role map (see :data:`BL18B_EXAMPLE_MOTORS`).

Motor roles are named with their unit (``zp_z_um``, ``energy_ev``): the same keys are the
``positions`` of a frame on the wire. A role maps to the *record* name of an EPICS motor
record; its fields (``.VAL``, ``.RBV`` ...) are appended by the motor client.
"""

from __future__ import annotations

from collections.abc import Mapping

DEFAULT_SIM_PREFIX = "TXMSIM:"
"""Prefix of the simulated beamline IOC (``txmlive sim``)."""

DEFAULT_LIVE_PREFIX = "TXM:LIVE:"
"""Prefix of the pipeline's PV server (``txmlive run``)."""

MOTOR_ROLES: dict[str, str] = {
    "zp_z_um": "ZP:Z",
    "zp_x_um": "ZP:X",
    "zp_y_um": "ZP:Y",
    "sample_x_um": "SAMPLE:X",
    "sample_y_um": "SAMPLE:Y",
    "sample_theta_deg": "SAMPLE:THETA",
    "energy_ev": "ENERGY",
    "shaker_amp_um": "SHAKER:AMP",
    "shaker_freq_hz": "SHAKER:FREQ",
    "beam_x": "BEAM:X",
    "beam_y": "BEAM:Y",
}
"""Default role → motor record name under the prefix (the simulator's names).

The steering roles ``beam_x``/``beam_y`` carry no unit in their name: a beamline steers with
whatever it has (a condenser translation in µm, a mirror pitch in µrad); the unit is the
record's ``.EGU``.
"""

MOTOR_UNITS: dict[str, str] = {
    "zp_z_um": "um",
    "zp_x_um": "um",
    "zp_y_um": "um",
    "sample_x_um": "um",
    "sample_y_um": "um",
    "sample_theta_deg": "deg",
    "energy_ev": "eV",
    "shaker_amp_um": "um",
    "shaker_freq_hz": "Hz",
    "beam_x": "um",
    "beam_y": "um",
}
"""Engineering units (``.EGU``) of each role; ASCII because EGU is a CA string."""

BL18B_EXAMPLE_MOTORS: dict[str, str] = {
    "zp_z_um": "BL18B:TXM:ZP:m3",
    "zp_x_um": "BL18B:TXM:ZP:m1",
    "zp_y_um": "BL18B:TXM:ZP:m2",
    "sample_x_um": "BL18B:TXM:SMP:m1",
    "sample_y_um": "BL18B:TXM:SMP:m2",
    "sample_theta_deg": "BL18B:TXM:SMP:m4",
    "energy_ev": "BL18B:DCM:Energy",
    "shaker_amp_um": "BL18B:TXM:SHK:Amp",
    "shaker_freq_hz": "BL18B:TXM:SHK:Freq",
    "beam_x": "BL18B:TXM:CND:m1",
    "beam_y": "BL18B:TXM:CND:m2",
}
"""An illustrative BL18B-style role map (full record names, used with an empty prefix).

The record names are examples of the usual ``IOC:device:mN`` pattern, not a survey of the
real beamline; copy and edit them into the config's role map.
"""

# Simulated IOC, non-motor PVs (areaDetector-style camera, shutter, storage ring).
CAM_ACQUIRE = "CAM:Acquire"
CAM_ACQUIRE_TIME = "CAM:AcquireTime"
CAM_FRAME_TYPE = "CAM:FrameType"
CAM_ARRAY_COUNTER = "CAM:ArrayCounter_RBV"
SHUTTER = "SHUTTER"
RING_CURRENT = "RING:CURRENT"

TRUTH_PVS: dict[str, str] = {
    "focus_z_um": "TRUTH:FOCUS_Z_UM",
    "beam_x_px": "TRUTH:BEAM_X_PX",
    "beam_y_px": "TRUTH:BEAM_Y_PX",
    "uniformity_cv": "TRUTH:UNIFORMITY_CV",
    "resolution_nm": "TRUTH:RESOLUTION_NM",
}
"""Simulation ground truth: key → suffix (simulator only; a real beamline has none)."""

# Pipeline PV server.
LIVE_METRIC_PVS: dict[str, str] = {
    "resolution_nm": "RESOLUTION_NM",
    "cutoff_per_um": "CUTOFF_PER_UM",
    "band_power": "BAND_POWER",
    "centroid_x_px": "BEAM:X_PX",
    "centroid_y_px": "BEAM:Y_PX",
    "uniformity_cv": "UNIFORMITY_CV",
    "vibration_nm": "VIBRATION_NM",
}
"""Key of a Result's ``metrics`` → suffix."""

LIVE_SEQ = "SEQ"

LIVE_COUNTER_PVS: dict[str, str] = {
    "received": "RECEIVED",
    "processed": "PROCESSED",
    "dropped": "DROPPED",
    "rejected_total": "REJECTED",
    "gaps": "GAPS",
}
"""Key of a Result's ``counters`` → suffix."""

LIVE_FPS = "FPS"
LIVE_LATENCY_P99 = "LATENCY_P99_MS"

LIVE_COMMAND_PVS: dict[str, str] = {
    "af_start": "AF:START",
    "af_abort": "AF:ABORT",
    "beamfb_enable": "BEAMFB:ENABLE",
    "beamfb_setpoint_x_px": "BEAMFB:SETPOINT_X_PX",
    "beamfb_setpoint_y_px": "BEAMFB:SETPOINT_Y_PX",
    "shaker_tune": "SHAKER:TUNE",
}
"""Control records a client puts to; each put becomes a command for the executor."""

LIVE_STATE_PVS: dict[str, str] = {
    "af_state": "AF:STATE",
    "af_verdict": "AF:VERDICT",
    "af_best_z_um": "AF:BEST_Z_UM",
    "beamfb_state": "BEAMFB:STATE",
    "beamfb_error_px": "BEAMFB:ERROR_PX",
    "shaker_verdict": "SHAKER:VERDICT",
}
"""Records the feedback side writes (through the server) to report its state."""


def pv(prefix: str, suffix: str) -> str:
    """The full PV name ``prefix + suffix``."""
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise TypeError(f"PV prefix and suffix must be str, got {prefix!r}, {suffix!r}")
    if not suffix:
        raise ValueError("PV suffix must not be empty")
    return prefix + suffix


def motor_pvs(prefix: str = DEFAULT_SIM_PREFIX,
              role_map: Mapping[str, str] | None = None) -> dict[str, str]:
    """Role → motor record name (no field) for every role in ``role_map``.

    Parameters
    ----------
    prefix : str
        Prefix put in front of every record name ('' when the map holds full names).
    role_map : mapping of str to str, optional
        Role → record name under the prefix; :data:`MOTOR_ROLES` when None.
    """
    role_map = MOTOR_ROLES if role_map is None else role_map
    return {role: pv(prefix, name) for role, name in role_map.items()}


def motor_pv(role: str, prefix: str = DEFAULT_SIM_PREFIX,
             role_map: Mapping[str, str] | None = None) -> str:
    """The motor record name of one role; a clear error for an unknown role."""
    role_map = MOTOR_ROLES if role_map is None else role_map
    if role not in role_map:
        raise KeyError(f"unknown motor role {role!r}; known: {sorted(role_map)}")
    return pv(prefix, role_map[role])
