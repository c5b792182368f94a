"""The per-frame metrics engine: configure once, call per frame, get a plain dict.

Two kinds of metrics, scheduled differently by the pipeline:

- :meth:`MetricsEngine.cheap`, on every frame on the processing thread: centroid, total and
  mean counts and illumination uniformity on the binned frame (:data:`CHEAP_KEYS`); what the
  beam-position loop acts on.
- :meth:`MetricsEngine.expensive_roi` on a copy of :meth:`MetricsEngine.roi_view`, on the
  metrics stage thread: focus scores, the shift relative to the previously measured ROI and the
  jitter RMS, and the radial PSD (resolution, band power, NA fill) (:data:`EXPENSIVE_KEYS`).
  When that stage cannot keep up it measures the newest frame and the others carry the last
  values; each result says which frame they describe (``metrics_seq``), so the shift is then
  relative to the last *measured* frame.

:meth:`MetricsEngine.expensive` takes a whole frame and :meth:`MetricsEngine.compute_all` does
both, for offline use.

The two dicts have disjoint keys, :data:`CHEAP_KEYS` and :data:`EXPENSIVE_KEYS`; together they
are :data:`METRIC_KEYS`, so a consumer merges the latest of each with ``dict.update`` and never
overwrites a value with a placeholder. Values are JSON-able: ``float``, ``str`` or ``None`` for
"not available" (no previous frame, no significant signal, NaN).

Units: positions in px of the full frame and µm at the sample (relative to the frame centre),
frequencies in µm⁻¹, resolution and jitter in nm, counts in the frame's own unit.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream.beam import beam_stats, bin_image_and_totals, binned_to_full_px, illumination_uniformity
from stream.focus import brenner, normalized_variance, tenengrad, vollath_f4
from stream.psd import RadialPsd, kernel_array
from stream.vibration import JitterTracker, PhaseCorrelator, min_significant_peak

CHEAP_KEYS = (
    "centroid_x_px", "centroid_y_px", "centroid_x_um", "centroid_y_um",
    "total_counts", "mean_counts", "uniformity_cv",
)
"""Keys of :meth:`MetricsEngine.cheap`."""

EXPENSIVE_KEYS = (
    "normalized_variance", "brenner", "tenengrad", "vollath_f4",
    "shift_x_px", "shift_y_px", "vibration_nm",
    "cutoff_per_um", "resolution_nm", "resolution_err_nm", "cutoff_x_per_um",
    "cutoff_y_per_um", "band_power", "na_fill", "psd_verdict",
)
"""Keys of :meth:`MetricsEngine.expensive`."""

METRIC_KEYS = CHEAP_KEYS + EXPENSIVE_KEYS
"""Keys of :meth:`MetricsEngine.compute_all`."""

DEFAULT_ROI_PX = 512
"""Side of the default central ROI (clipped to the frame)."""


@dataclass(frozen=True)
class MetricsConfig:
    """Settings of a :class:`MetricsEngine`.

    Attributes
    ----------
    roi : tuple of int or None
        ``(row, col, height, width)`` of the ROI for focus scores, shift and PSD, in full-frame
        pixels; None = the central ``512 × 512`` clipped to the frame. Each side ≥ 32.
    pixel_nm : float
        Pixel size at the sample, nm, used when a call passes none.
    dr_nm : float or None
        Zone-plate outermost zone width, nm, for the NA-fill estimate (None = not reported).
    band_per_um : tuple of float
        ``(lo, hi)`` band for ``band_power``, µm⁻¹.
    threshold : float
        PSD cut-off at ``threshold × noise floor`` (> 1).
    bin_factor : int
        Binning of the full frame before centroid and uniformity.
    centroid_fraction : float
        Background for the centroid as a fraction of the binned frame's maximum, in [0, 1):
        0 weights every pixel by its intensity (centre of mass of the whole field); 0.5 or
        more follows only the bright condenser spot, not the illuminated field around it.
        The default 0.9 keeps following the beam after the shaker has flattened the field:
        on a field flat to ~1.5 % the centre of mass moves ~0.03 px per px of beam motion,
        the top-10 % centroid ~0.5 px per px (the beam loop calibrates whichever is used).
    uniformity_sigma_px : float
        Gaussian smoothing for the uniformity, in binned pixels. Kept small (0.5): binning
        already averages the photon noise (64 px per binned pixel at the default bin 8), and
        wider smoothing pulls the dim corners towards the centre, so a 256² frame (32 binned
        px across) read σ = 2 as a field up to a third flatter than it is.
    fov_fraction : float
        Field of view for the uniformity: smoothed field ≥ this fraction of its maximum.
    shift_px : int
        Side of the central crop of the ROI on which frame-to-frame shifts are measured.
    jitter_window : int
        Shifts in the sliding window of the jitter RMS.
    """

    roi: tuple[int, int, int, int] | None = None
    pixel_nm: float = 10.0
    dr_nm: float | None = None
    band_per_um: tuple[float, float] = (5.0, 15.0)
    threshold: float = 2.0
    bin_factor: int = 8
    centroid_fraction: float = 0.9
    uniformity_sigma_px: float = 0.5
    fov_fraction: float = 0.5
    shift_px: int = 256
    jitter_window: int = 50

    def __post_init__(self) -> None:
        if self.roi is not None:
            if len(self.roi) != 4 or any(int(v) != v for v in self.roi):
                raise ValueError(f"roi must be (row, col, height, width) integers, got {self.roi}")
            row, col, h, w = self.roi
            if row < 0 or col < 0 or h < 32 or w < 32:
                raise ValueError(f"roi {self.roi}: origin must be >= 0 and both sides >= 32")
        _positive("pixel_nm", self.pixel_nm)
        if self.dr_nm is not None:
            _positive("dr_nm", self.dr_nm)
        lo, hi = self.band_per_um
        if not 0 <= lo < hi:
            raise ValueError(f"band_per_um must be (lo, hi) with 0 <= lo < hi, got "
                             f"{self.band_per_um}")
        if not self.threshold > 1:
            raise ValueError(f"threshold must be > 1, got {self.threshold}")
        if int(self.bin_factor) != self.bin_factor or self.bin_factor < 1:
            raise ValueError(f"bin_factor must be a positive integer, got {self.bin_factor}")
        if not 0 <= self.centroid_fraction < 1:
            raise ValueError(f"centroid_fraction must be in [0, 1), got {self.centroid_fraction}")
        _positive("uniformity_sigma_px", self.uniformity_sigma_px)
        if not 0 < self.fov_fraction < 1:
            raise ValueError(f"fov_fraction must be in (0, 1), got {self.fov_fraction}")
        if int(self.shift_px) != self.shift_px or self.shift_px < 16:
            raise ValueError(f"shift_px must be an integer >= 16, got {self.shift_px}")
        if int(self.jitter_window) != self.jitter_window or self.jitter_window < 3:
            raise ValueError(f"jitter_window must be an integer >= 3, got {self.jitter_window}")


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def roi_slices(config_roi: tuple[int, int, int, int] | None,
               shape: tuple[int, int]) -> tuple[slice, slice]:
    """Slices of the ROI in a frame of ``shape``.

    ``None`` gives the central ``512 × 512`` clipped to the frame; an explicit ROI must lie
    inside the frame.
    """
    rows, cols = shape
    if config_roi is None:
        h, w = min(DEFAULT_ROI_PX, rows), min(DEFAULT_ROI_PX, cols)
        row, col = (rows - h) // 2, (cols - w) // 2
    else:
        row, col, h, w = (int(v) for v in config_roi)
        if row + h > rows or col + w > cols:
            raise ValueError(f"roi {config_roi} (row, col, height, width) does not fit in the "
                             f"frame of shape {shape}")
    return slice(row, row + h), slice(col, col + w)


def _num(value: float | None) -> float | None:
    """Plain float for JSON, None for missing or non-finite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsEngine:
    """Configure once, then compute the named metrics per frame.

    ``cheap`` keeps a binning buffer and ``expensive``/``expensive_roi`` the previous ROI's
    spectrum and the jitter track, each guarded by its own lock; they share nothing else, so
    ``cheap`` on the processing thread and ``expensive_roi`` on the metrics stage thread run
    concurrently (the numba kernels and FFTs release the GIL). Each is meant for frames in
    order.

    Parameters
    ----------
    config : MetricsConfig, optional
    """

    def __init__(self, config: MetricsConfig | None = None):
        self.config = config if config is not None else MetricsConfig()
        self._cheap_lock = threading.Lock()
        self._expensive_lock = threading.Lock()
        self._psd: RadialPsd | None = None
        self._corr: PhaseCorrelator | None = None
        self._prev_spec: np.ndarray | None = None
        self._prev_key: tuple[Any, ...] | None = None
        self._jitter = JitterTracker(self.config.jitter_window)
        self._bin_buf: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the previous frame and the jitter track (call after a commanded move)."""
        with self._expensive_lock:
            self._prev_spec = None
            self._prev_key = None
            self._jitter.reset()

    def warm_up(self, shape: tuple[int, int], dtypes: tuple[Any, ...] = (np.uint16, np.float32),
                pixel_nm: float | None = None) -> None:
        """Compile every kernel for frames of ``shape`` and ``dtypes``, then :meth:`reset`.

        Call once at start-up so the first real frame is not slow. Frames are run writeable and
        read-only (as decoded zero-copy from the wire), which numba compiles separately.
        """
        rng = np.random.default_rng(0)
        for dtype in dtypes:
            frame = rng.poisson(100.0, size=shape).astype(dtype)
            for writeable in (True, False):
                frame.setflags(write=writeable)
                self.compute_all(frame, pixel_nm)
                self.cheap(frame, pixel_nm)
        self.reset()

    def _pixel_nm(self, pixel_nm: float | None) -> float:
        value = self.config.pixel_nm if pixel_nm is None else pixel_nm
        _positive("pixel_nm", value)
        return float(value)

    @staticmethod
    def _frame(image: np.ndarray) -> np.ndarray:
        arr = np.asarray(image)
        if arr.ndim != 2:
            raise ValueError(f"image must be 2-D (rows, cols), got shape {arr.shape}")
        if arr.dtype.kind not in "uif":
            raise TypeError(f"image must have an integer or float dtype, got {arr.dtype}")
        return arr

    def cheap(self, image: np.ndarray, pixel_nm: float | None = None) -> dict[str, Any]:
        """Every-frame metrics of the whole frame (:data:`CHEAP_KEYS`).

        Parameters
        ----------
        image : array_like, shape (rows, cols)
            Raw or corrected frame, any integer or float dtype; not modified.
        pixel_nm : float, optional
            Pixel size at the sample, nm (default ``config.pixel_nm``).

        Returns
        -------
        dict
            Centroid (full-frame px and µm from the frame centre), total and mean counts and
            uniformity, all on the binned frame.
        """
        arr = self._frame(image)
        pix = self._pixel_nm(pixel_nm)
        with self._cheap_lock:
            return self._beam(arr, pix)

    def _beam(self, arr: np.ndarray, pix: float) -> dict[str, Any]:
        cfg = self.config
        factor = min(cfg.bin_factor, min(arr.shape))
        shape = (arr.shape[0] // factor, arr.shape[1] // factor)
        if self._bin_buf is None or self._bin_buf.shape != shape:
            self._bin_buf = np.empty(shape, dtype=np.float32)
        binned, total, n = bin_image_and_totals(arr, factor, out=self._bin_buf)
        background = 0.0
        if cfg.centroid_fraction > 0 and np.isfinite(binned).any():
            background = cfg.centroid_fraction * float(np.nanmax(binned))
        stats = beam_stats(binned, background=background)
        cy = binned_to_full_px(stats.centroid_y_px, factor)
        cx = binned_to_full_px(stats.centroid_x_px, factor)
        return {
            "centroid_x_px": _num(cx),
            "centroid_y_px": _num(cy),
            "centroid_x_um": _num((cx - 0.5 * (arr.shape[1] - 1)) * pix * 1e-3),
            "centroid_y_um": _num((cy - 0.5 * (arr.shape[0] - 1)) * pix * 1e-3),
            "total_counts": _num(total),
            "mean_counts": _num(total / n) if n else None,
            "uniformity_cv": _num(illumination_uniformity(
                binned, cfg.uniformity_sigma_px, cfg.fov_fraction)),
        }

    def _shift(self, roi: np.ndarray, pix: float) -> dict[str, Any]:
        side = (min(self.config.shift_px, roi.shape[0]), min(self.config.shift_px, roi.shape[1]))
        y0 = (roi.shape[0] - side[0]) // 2
        x0 = (roi.shape[1] - side[1]) // 2
        crop = roi[y0:y0 + side[0], x0:x0 + side[1]]
        if self._corr is None or self._corr.shape != side:
            self._corr = PhaseCorrelator(side)
        spec = self._corr.spectrum(crop)
        key = (roi.shape, pix)
        dy = dx = None
        if self._prev_spec is not None and self._prev_key == key:
            sy, sx, peak = self._corr.shift_spectra(self._prev_spec, spec)
            if peak >= min_significant_peak(side) and math.isfinite(sy) and math.isfinite(sx):
                dy, dx = sy, sx
        if dy is None:
            self._jitter.reset()
        else:
            self._jitter.update(dy, dx, pix)
        self._prev_spec, self._prev_key = spec, key
        return {
            "shift_x_px": _num(dx),
            "shift_y_px": _num(dy),
            "vibration_nm": _num(self._jitter.rms_nm),
        }

    def roi_view(self, image: np.ndarray) -> np.ndarray:
        """The configured ROI of a frame, as a view (no copy).

        The pipeline copies it (small) and hands the copy to :meth:`expensive_roi` on a side
        thread, so the full frame need not stay alive for the PSD.
        """
        arr = self._frame(image)
        return arr[roi_slices(self.config.roi, arr.shape)]

    def expensive(self, image: np.ndarray, pixel_nm: float | None = None) -> dict[str, Any]:
        """PSD metrics of the frame's ROI (:data:`EXPENSIVE_KEYS`); see :mod:`stream.psd`.

        Parameters
        ----------
        image : array_like, shape (rows, cols)
            Raw or corrected frame; not modified.
        pixel_nm : float, optional
            Pixel size at the sample, nm (default ``config.pixel_nm``).

        Returns
        -------
        dict
            ``cutoff_per_um``, ``resolution_nm`` and ``resolution_err_nm`` (None unless the
            verdict is ``resolved`` or, for the first two as bounds, ``nyquist_limited``),
            ``cutoff_x_per_um``, ``cutoff_y_per_um``, ``band_power``, ``na_fill`` and
            ``psd_verdict``.
        """
        return self.expensive_roi(self.roi_view(image), pixel_nm)

    def expensive_roi(self, roi: np.ndarray, pixel_nm: float | None = None, *,
                      with_curve: bool = False) -> dict[str, Any]:
        """:meth:`expensive` of a ROI already cut from the frame (by :meth:`roi_view`).

        Keeps state (the previous ROI's spectrum and the jitter track), so call it for frames
        in order.

        With ``with_curve`` the dict also holds ``psd_curve``: the radial PSD itself
        (``freqs_per_um``, ``psd`` as lists and the noise ``floor``) for viewers; it is not one
        of :data:`EXPENSIVE_KEYS` and stays out of per-frame results.
        """
        roi = self._frame(roi)
        pix = self._pixel_nm(pixel_nm)
        cfg = self.config
        with self._expensive_lock:
            psd = self._psd
            if psd is None or psd.shape != roi.shape or psd.pixel_nm != pix:
                psd = self._psd = RadialPsd(roi.shape, pix, threshold=cfg.threshold,
                                            band_per_um=cfg.band_per_um, dr_nm=cfg.dr_nm)
        result = psd(roi)
        # One contiguous copy of a kernel dtype serves all ROI kernels (see kernel_array).
        kroi = kernel_array(roi)
        out = {
            "normalized_variance": _num(normalized_variance(kroi)),
            "brenner": _num(brenner(kroi)),
            "tenengrad": _num(tenengrad(kroi)),
            "vollath_f4": _num(vollath_f4(kroi)),
        }
        with self._expensive_lock:
            out.update(self._shift(kroi, pix))
        out.update({
            "cutoff_per_um": _num(result.cutoff_per_um),
            "resolution_nm": _num(result.resolution_nm),
            "resolution_err_nm": _num(result.resolution_err_nm),
            "cutoff_x_per_um": _num(result.cutoff_x_per_um),
            "cutoff_y_per_um": _num(result.cutoff_y_per_um),
            "band_power": _num(result.band_power),
            "na_fill": _num(result.na_fill),
            "psd_verdict": result.verdict,
        })
        if with_curve:
            out["psd_curve"] = {"freqs_per_um": result.freqs_per_um.tolist(),
                                "psd": result.psd.tolist(), "floor": _num(result.floor)}
        return out

    def compute_all(self, image: np.ndarray, pixel_nm: float | None = None) -> dict[str, Any]:
        """:meth:`cheap` and :meth:`expensive` merged (:data:`METRIC_KEYS`), for offline use."""
        out = self.cheap(image, pixel_nm)
        out.update(self.expensive(image, pixel_nm))
        return out
