"""The live viewer's view model: what to show, computed from decoded preview messages.

Pure logic, no vispy, so every number the viewer draws is tested without a GPU. The model
keeps the newest preview and its image, fixed-length time traces (focus score, resolution,
beam x/y error, vibration RMS), the percentile clip of the auto contrast, and the time the last
preview arrived (staleness, from an injectable clock).

Preview keys read (see :mod:`stream.publish`): ``seq``, ``t_ns``, ``bin``, ``pixel_nm`` (of the
binned image), ``metrics``, ``counters``, ``status``. Optional keys, looked up in ``metrics``
first and then at the top level of the message:

- ``psd_freqs_per_um``, ``psd`` (equal-length lists) and ``psd_floor`` (scalar, PSD units):
  the radial PSD curve and its noise floor;
- ``metrics_roi``: ``[row, col, height, width]`` of the metrics ROI, full-frame px;

Feedback loops report in ``status`` as ``{loop}_state`` and ``{loop}_verdict`` strings (the PV
server's names: ``af_state``, ``af_verdict``, ``beamfb_state``, ``shaker_verdict``), and the beam
loop's setpoint as ``beamfb_setpoint_x_px``, ``beamfb_setpoint_y_px`` (full-frame px, as
``BEAMFB:SETPOINT_X_PX``); without them the beam error is taken from the field centre.

Coordinates: full-frame pixel ``p`` (pixel centres at integers) lies at ``(p + 0.5) / bin`` in
the preview's image coordinates, where preview pixel ``i`` covers ``[i, i + 1)``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream.publish import preview_image

DEFAULT_CLIP_PCT = (1.0, 99.5)
"""Default auto-contrast clip: low and high percentiles of the finite pixels."""

CONTRAST_SAMPLES = 1 << 18
"""Pixels at most that the percentiles are computed on (a regular stride beyond)."""

TRACE_NAMES = ("focus", "resolution_nm", "beam_x_err_px", "beam_y_err_px", "vibration_nm")
"""The model's time traces, in this order."""


def contrast_limits(image: np.ndarray, low_pct: float = DEFAULT_CLIP_PCT[0],
                    high_pct: float = DEFAULT_CLIP_PCT[1]) -> tuple[float, float]:
    """Display limits by percentile clip, ignoring NaN and ±inf pixels.

    Parameters
    ----------
    image : ndarray, shape (rows, cols)
        Any numeric dtype. Images over :data:`CONTRAST_SAMPLES` pixels are sampled on a regular
        stride (the limits of a smooth histogram barely move, the cost drops).
    low_pct, high_pct : float
        Percentiles, ``0 <= low_pct < high_pct <= 100``.

    Returns
    -------
    (lo, hi) : tuple of float
        ``lo < hi`` always: a flat image gives ``(v - 0.5, v + 0.5)``, an image without a
        finite pixel ``(0.0, 1.0)``.
    """
    if not 0.0 <= low_pct < high_pct <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got "
                         f"({low_pct}, {high_pct})")
    arr = np.asarray(image)
    if arr.dtype.kind not in "uifb":
        raise TypeError(f"image must be numeric, got dtype {arr.dtype}")
    flat = arr.reshape(-1)
    if flat.size > CONTRAST_SAMPLES:
        flat = flat[:: -(-flat.size // CONTRAST_SAMPLES)]
    if flat.dtype.kind == "f":
        flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(flat, [low_pct, high_pct]))
    if hi <= lo:
        return lo - 0.5, lo + 0.5
    return lo, hi


@dataclass(frozen=True)
class ScaleBar:
    """A round scale-bar length and how long it is on the image.

    Attributes
    ----------
    length_um : float
        1, 2 or 5 × 10^k µm.
    length_px : float
        The same length in image pixels.
    label : str
        E.g. ``"5 µm"``, ``"0.2 µm"``.
    """

    length_um: float
    length_px: float
    label: str


def scale_bar(pixel_nm: float, width_px: int, fraction: float = 0.25) -> ScaleBar:
    """The largest round length (1, 2, 5 × 10^k µm) not longer than ``fraction`` of the width.

    Parameters
    ----------
    pixel_nm : float
        Pixel size of the image at the sample, nm.
    width_px : int
        Image width, px.
    fraction : float
        Longest bar as a fraction of the width, in (0, 1].
    """
    if not (math.isfinite(pixel_nm) and pixel_nm > 0):
        raise ValueError(f"pixel_nm must be a positive number, got {pixel_nm!r}")
    if width_px < 1:
        raise ValueError(f"width_px must be >= 1, got {width_px}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    longest_um = fraction * width_px * pixel_nm * 1e-3
    exponent = math.floor(math.log10(longest_um))
    length_um = 10.0 ** exponent
    for mantissa in (5.0, 2.0):
        if mantissa * 10.0 ** exponent <= longest_um * (1 + 1e-12):
            length_um = mantissa * 10.0 ** exponent
            break
    # Round away float noise such as 0.30000000000000004 before labelling.
    length_um = float(f"{length_um:.12g}")
    return ScaleBar(length_um, length_um * 1e3 / pixel_nm, f"{length_um:g} µm")


def _num(value: Any) -> float | None:
    """Finite float, or None for missing/non-numeric/non-finite values."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value: Any, spec: str) -> str:
    num = _num(value)
    return "–" if num is None else format(num, spec)


def loop_states(status: Mapping[str, Any]) -> dict[str, tuple[str | None, str | None]]:
    """``{loop: (state, verdict)}`` from ``{loop}_state`` / ``{loop}_verdict`` string keys."""
    loops: dict[str, list[str | None]] = {}
    for key, value in status.items():
        if not isinstance(value, str):
            continue
        for suffix, index in (("_state", 0), ("_verdict", 1)):
            if key.endswith(suffix) and len(key) > len(suffix):
                loops.setdefault(key[: -len(suffix)], [None, None])[index] = value
    return {name: (sv[0], sv[1]) for name, sv in sorted(loops.items())}


def status_text(message: Mapping[str, Any] | None, age_s: float | None = None,
                stale: bool = False, paused: bool = False) -> str:
    """The status bar: seq, fps, latency p50/p99, dropped/rejected/gap counters, loops, age.

    Parameters
    ----------
    message : dict or None
        The newest decoded preview; None before the first one.
    age_s : float or None
        Seconds since it arrived.
    stale, paused : bool
        Append ``STALE <age> s`` / ``PAUSED``.
    """
    if message is None:
        text = "waiting for previews"
        if age_s is not None:
            text += f" ({age_s:.1f} s)"
        return text
    status = message.get("status") or {}
    counters = message.get("counters") or {}
    latency = status.get("latency_ms") or {}
    parts = [
        f"seq {message.get('seq')}",
        f"{_fmt(status.get('fps'), '.1f')} fps",
        f"latency p50 {_fmt(latency.get('p50'), '.1f')} ms "
        f"p99 {_fmt(latency.get('p99'), '.1f')} ms",
        f"dropped {counters.get('dropped', '–')}",
        f"rejected {counters.get('rejected_total', '–')}",
        f"gaps {counters.get('gaps', '–')}",
    ]
    for name, (state, verdict) in loop_states(status).items():
        parts.append(f"{name} {state or '–'}" + (f" ({verdict})" if verdict else ""))
    if paused:
        parts.append("PAUSED")
    if stale and age_s is not None:
        parts.append(f"STALE {age_s:.1f} s")
    return "  |  ".join(parts)


def _lookup(message: Mapping[str, Any], key: str) -> Any:
    metrics = message.get("metrics") or {}
    return metrics[key] if key in metrics else message.get(key)


def full_to_preview(full_px: float, bin_factor: int) -> float:
    """Full-frame pixel coordinate (centres at integers) → preview image coordinate."""
    return (full_px + 0.5) / bin_factor


@dataclass(frozen=True)
class PsdCurve:
    """The radial PSD of a preview and its marks.

    Attributes
    ----------
    freqs_per_um, psd : ndarray of float64, shape (n,)
        Spatial frequency, µm⁻¹, and power (non-finite values kept, the viewer skips them).
    floor : float or None
        Noise floor, PSD units.
    cutoff_per_um, resolution_nm, resolution_err_nm : float or None
    verdict : str or None
    """

    freqs_per_um: np.ndarray
    psd: np.ndarray
    floor: float | None
    cutoff_per_um: float | None
    resolution_nm: float | None
    resolution_err_nm: float | None
    verdict: str | None

    @property
    def label(self) -> str:
        """E.g. ``"32.1 ± 1.5 nm (resolved)"`` or ``"no resolution (flat)"``."""
        if self.resolution_nm is None:
            text = "no resolution"
        elif self.resolution_err_nm is None:
            text = f"{self.resolution_nm:.1f} nm"
        else:
            text = f"{self.resolution_nm:.1f} ± {self.resolution_err_nm:.1f} nm"
        return text + (f" ({self.verdict})" if self.verdict else "")


def psd_curve(message: Mapping[str, Any]) -> PsdCurve | None:
    """The PSD curve of a preview, or None when it carries none (or a malformed one)."""
    freqs, psd = _lookup(message, "psd_freqs_per_um"), _lookup(message, "psd")
    if not isinstance(freqs, list | tuple) or not isinstance(psd, list | tuple):
        return None
    if len(freqs) != len(psd) or len(freqs) < 2:
        return None
    try:
        f = np.asarray(freqs, dtype=np.float64)
        p = np.asarray(psd, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    metrics = message.get("metrics") or {}
    verdict = metrics.get("psd_verdict")
    return PsdCurve(f, p, _num(_lookup(message, "psd_floor")), _num(metrics.get("cutoff_per_um")),
                    _num(metrics.get("resolution_nm")), _num(metrics.get("resolution_err_nm")),
                    verdict if isinstance(verdict, str) else None)


class Trace:
    """A fixed-length time series; missing values are kept as NaN (gaps in the plot).

    Parameters
    ----------
    maxlen : int
        Samples kept; older ones fall off.
    """

    def __init__(self, maxlen: int):
        if maxlen < 2:
            raise ValueError(f"trace length must be >= 2, got {maxlen}")
        self.t_s: deque[float] = deque(maxlen=maxlen)
        self.values: deque[float] = deque(maxlen=maxlen)

    def append(self, t_s: float, value: float | None) -> None:
        self.t_s.append(float(t_s))
        self.values.append(math.nan if value is None else float(value))

    def __len__(self) -> int:
        return len(self.values)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(t_s, values)``, float64 arrays of the same length."""
        return np.fromiter(self.t_s, np.float64), np.fromiter(self.values, np.float64)

    @property
    def latest(self) -> float | None:
        """The newest finite value, None if there is none."""
        for value in reversed(self.values):
            if math.isfinite(value):
                return value
        return None


class ViewModel:
    """State of the live view, fed with decoded preview messages.

    Parameters
    ----------
    stale_s : float
        Seconds without a new preview after which the view is stale.
    trace_len : int
        Samples kept per time trace.
    clip_pct : tuple of float
        Default ``(low, high)`` percentiles of the auto contrast.
    focus_key : str
        The metric plotted as the focus score.
    clock : callable
        Monotonic seconds; injectable for tests.
    """

    def __init__(self, *, stale_s: float = 2.0, trace_len: int = 600,
                 clip_pct: tuple[float, float] = DEFAULT_CLIP_PCT,
                 focus_key: str = "normalized_variance",
                 clock: Callable[[], float] = time.monotonic):
        if not stale_s > 0:
            raise ValueError(f"stale_s must be > 0, got {stale_s}")
        contrast_limits(np.zeros((1, 1)), *clip_pct)  # validates the percentiles
        self.stale_s = float(stale_s)
        self.default_clip_pct = (float(clip_pct[0]), float(clip_pct[1]))
        self.clip_pct = self.default_clip_pct
        self.focus_key = focus_key
        self.clock = clock
        self.traces = {name: Trace(trace_len) for name in TRACE_NAMES}
        self.message: dict[str, Any] | None = None
        self.image: np.ndarray | None = None
        self.previews = 0
        self._t_arrived: float | None = None
        self._t_started = clock()
        self._contrast: tuple[tuple[Any, ...], tuple[float, float]] | None = None

    # -- input ------------------------------------------------------------------------------
    def update(self, message: dict[str, Any]) -> bool:
        """Take a decoded preview; False (and nothing changes) if it repeats the last ``seq``.

        Raises
        ------
        ValueError
            If the message lacks ``seq``/``t_ns``/``bin`` or its image does not match its
            ``shape``/``dtype``.
        """
        for key in ("seq", "t_ns", "bin", "shape", "dtype", "image"):
            if key not in message:
                raise ValueError(f"preview message lacks {key!r}")
        if self.message is not None and message["seq"] == self.message["seq"]:
            return False
        try:
            image = preview_image(message)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"preview image does not match shape {message['shape']} and "
                             f"dtype {message['dtype']!r}: {exc}") from exc
        if image.ndim != 2:
            raise ValueError(f"preview image must be 2-D, got shape {image.shape}")
        self.message, self.image = message, image
        self.previews += 1
        self._t_arrived = self.clock()
        self._append_traces(message)
        return True

    def _append_traces(self, message: dict[str, Any]) -> None:
        metrics = message.get("metrics") or {}
        t_s = message["t_ns"] * 1e-9
        err_x, err_y = self.beam_error_px()
        values = {
            "focus": _num(metrics.get(self.focus_key)),
            "resolution_nm": _num(metrics.get("resolution_nm")),
            "beam_x_err_px": err_x,
            "beam_y_err_px": err_y,
            "vibration_nm": _num(metrics.get("vibration_nm")),
        }
        for name, value in values.items():
            self.traces[name].append(t_s, value)

    # -- contrast ---------------------------------------------------------------------------
    def set_clip(self, low_pct: float, high_pct: float) -> None:
        """Set the auto-contrast percentiles (validated)."""
        contrast_limits(np.zeros((1, 1)), low_pct, high_pct)
        self.clip_pct = (float(low_pct), float(high_pct))

    def scale_clip(self, factor: float) -> None:
        """Multiply both clipped tails by ``factor`` (> 1: more contrast, < 1: less).

        Ignored when the tails would leave less than 1 % of the histogram; a zero tail stays 0.
        """
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        low, high = self.clip_pct
        low_tail, high_tail = low * factor, (100.0 - high) * factor
        if low_tail + high_tail < 99.0:
            self.set_clip(low_tail, 100.0 - high_tail)

    def reset_contrast(self) -> None:
        self.clip_pct = self.default_clip_pct

    def contrast(self) -> tuple[float, float]:
        """``(lo, hi)`` display limits of the current image (cached per preview and clip)."""
        if self.image is None:
            return 0.0, 1.0
        key = (self.previews, self.clip_pct)
        if self._contrast is None or self._contrast[0] != key:
            self._contrast = (key, contrast_limits(self.image, *self.clip_pct))
        return self._contrast[1]

    # -- derived quantities -----------------------------------------------------------------
    @property
    def bin_factor(self) -> int:
        return int(self.message["bin"]) if self.message is not None else 1

    def age_s(self) -> float | None:
        """Seconds since the last preview arrived (None before the first)."""
        return None if self._t_arrived is None else self.clock() - self._t_arrived

    def waiting_s(self) -> float:
        """Seconds since the model started (how long the viewer has been waiting)."""
        return self.clock() - self._t_started

    def is_stale(self) -> bool:
        """True when no preview arrived for more than ``stale_s`` (or none yet)."""
        age = self.age_s()
        return age is None or age > self.stale_s

    def status_text(self, paused: bool = False) -> str:
        if self.message is None:
            return status_text(None, self.waiting_s())
        return status_text(self.message, self.age_s(), self.is_stale(), paused)

    def scale_bar(self, fraction: float = 0.25) -> ScaleBar | None:
        """Scale bar for the current image, None without an image or ``pixel_nm``."""
        if self.image is None:
            return None
        pixel_nm = _num(self.message.get("pixel_nm"))
        if pixel_nm is None or pixel_nm <= 0:
            return None
        return scale_bar(pixel_nm, self.image.shape[1], fraction)

    def psd(self) -> PsdCurve | None:
        return None if self.message is None else psd_curve(self.message)

    def roi_rect(self) -> tuple[float, float, float, float] | None:
        """Metrics ROI as ``(x0, y0, x1, y1)`` in preview image coordinates, or None."""
        if self.message is None:
            return None
        roi = _lookup(self.message, "metrics_roi")
        if not isinstance(roi, list | tuple) or len(roi) != 4:
            return None
        vals = [_num(v) for v in roi]
        if any(v is None for v in vals):
            return None
        row, col, h, w = vals
        b = self.bin_factor
        return col / b, row / b, (col + w) / b, (row + h) / b

    def _field_centre_px(self) -> tuple[float, float]:
        """Field centre ``(x, y)`` in full-frame px (the preview holds ``shape × bin`` px)."""
        rows, cols = self.image.shape
        b = self.bin_factor
        return 0.5 * (cols * b - 1), 0.5 * (rows * b - 1)

    def centroid(self) -> tuple[float, float] | None:
        """Beam centroid ``(x, y)`` in preview image coordinates, or None."""
        if self.message is None:
            return None
        metrics = self.message.get("metrics") or {}
        cx, cy = _num(metrics.get("centroid_x_px")), _num(metrics.get("centroid_y_px"))
        if cx is None or cy is None:
            return None
        return full_to_preview(cx, self.bin_factor), full_to_preview(cy, self.bin_factor)

    def _setpoint_full_px(self) -> tuple[float, float] | None:
        status = (self.message or {}).get("status") or {}
        sx = _num(status.get("beamfb_setpoint_x_px"))
        sy = _num(status.get("beamfb_setpoint_y_px"))
        return None if sx is None or sy is None else (sx, sy)

    def setpoint(self) -> tuple[float, float] | None:
        """Beam setpoint ``(x, y)`` in preview image coordinates, or None when not sent."""
        if self.message is None:
            return None
        full = self._setpoint_full_px()
        if full is None:
            return None
        b = self.bin_factor
        return full_to_preview(full[0], b), full_to_preview(full[1], b)

    def beam_error_px(self) -> tuple[float | None, float | None]:
        """Centroid − setpoint (field centre when none is sent), full-frame px."""
        if self.message is None:
            return None, None
        metrics = self.message.get("metrics") or {}
        cx, cy = _num(metrics.get("centroid_x_px")), _num(metrics.get("centroid_y_px"))
        sx, sy = self._setpoint_full_px() or self._field_centre_px()
        return (None if cx is None else cx - sx), (None if cy is None else cy - sy)
