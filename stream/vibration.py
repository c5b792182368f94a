"""Image shifts by phase correlation, vibration (jitter) tracking and registered averaging.

Sign convention everywhere: a shift ``(dy, dx)`` of ``img`` relative to ``ref`` means
``img[y, x] ≈ ref[y − dy, x − dx]`` — the content of ``img`` sits ``dy`` rows lower and ``dx``
columns further right. Registering ``img`` onto ``ref`` applies ``(−dy, −dx)``.

Phase correlation works on Hann-windowed, plane-removed ROIs (:class:`stream.psd.
WindowedSpectrum`). The integer peak of the inverse FFT of the normalised cross-power spectrum
gives the shift to the nearest pixel; the sub-pixel part is a weighted least-squares fit of the
residual phase plane of the cross-power spectrum, weighted by its magnitude (signal-dominated
frequencies count, noise-dominated ones hardly), over the frequencies within
:data:`FIT_RADIUS` where a residual shift of at most half a pixel cannot wrap the phase. It is
exact for a pure translation and costs one pass over the spectrum (no upsampled DFT).

References
----------
.. [1] C. D. Kuglin, D. C. Hines, "The phase correlation image alignment method", Proc. IEEE
   Int. Conf. Cybernetics and Society, 163 (1975).
.. [2] H. S. Stone, M. T. Orchard, E.-C. Chang, S. A. Martucci, "A fast direct Fourier-based
   algorithm for subpixel registration of images", IEEE Trans. Geosci. Remote Sens. 39, 2235
   (2001) (phase-plane fit).
.. [3] W. S. Hoge, "A subspace identification extension to the phase correlation method",
   IEEE Trans. Med. Imaging 22, 277 (2003).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

import numpy as np
import scipy.fft
from numba import njit

from stream.psd import FAST, WindowedSpectrum

FIT_RADIUS = 0.3
"""Radius (cycles per pixel) of the disc of frequencies used in the phase-plane fit. Beyond it
the pixel sampling of sub-pixel-sharp structure aliases content whose phase does not follow the
shift, and photon noise dominates; a fit out to Nyquist was 2-3× less accurate on rendered
shifted Siemens stars. Inside it a residual shift of half a pixel along each axis turns the
phase by at most 0.42·π, so it cannot wrap."""

PEAK_SIGMAS = 8.0
"""A phase-correlation peak is significant when it exceeds ``PEAK_SIGMAS / √(rows·cols)``:
for unrelated images each correlation value has a standard deviation of ``1 / √(rows·cols)``,
so the largest of ~10⁵ values stays below ~5 of them."""


@njit(nogil=True, cache=True, fastmath=FAST)
def _cross_power(spec_img, spec_ref, cross, normalized):  # pragma: no cover - compiled
    """``cross = img · conj(ref)`` and ``normalized = cross / |cross|`` (0 where it is 0)."""
    h, w = spec_img.shape
    for y in range(h):
        for x in range(w):
            a = spec_img[y, x]
            b = spec_ref[y, x]
            re = a.real * b.real + a.imag * b.imag
            im = a.imag * b.real - a.real * b.imag
            mag2 = re * re + im * im
            inv = 1.0 / np.sqrt(mag2) if mag2 > 0.0 else 0.0
            cross[y, x] = complex(re, im)
            normalized[y, x] = complex(re * inv, im * inv)


@njit(nogil=True, cache=True, fastmath=FAST)
def _phase_plane(cross, full_w, py, px):  # pragma: no cover - compiled
    """Sub-pixel ``(dy, dx)`` beyond the integer shift ``(py, px)`` from the cross-power phase.

    ``cross`` is the rfft2 half plane of an image with ``full_w`` columns. The phase of
    ``cross · exp(+i(uy·py + ux·px))`` is fitted as ``−(uy·dy + ux·dx)`` by weighted least
    squares with weight ``|cross|`` (twice for columns standing for their conjugate mirror),
    over ``(ky/H)² + (kx/W)² ≤ FIT_RADIUS²``. Returns NaN if the normal equations are singular.
    """
    h, w = cross.shape
    n_x = min(w, int(FIT_RADIUS * full_w) + 1)
    rot_x = np.empty(n_x, dtype=np.complex128)
    for x in range(n_x):
        rot_x[x] = np.exp(1j * (2.0 * np.pi * x / full_w) * px)
    syy = 0.0
    syx = 0.0
    sxx = 0.0
    by = 0.0
    bx = 0.0
    for y in range(h):
        ky = y if y <= h // 2 else y - h
        fy = ky / h
        if fy * fy > FIT_RADIUS * FIT_RADIUS:
            continue
        uy = 2.0 * np.pi * fy
        rot_y = np.exp(1j * uy * py)
        for x in range(n_x):
            fx = x / full_w
            if fy * fy + fx * fx > FIT_RADIUS * FIT_RADIUS or (ky == 0 and x == 0):
                continue
            ux = 2.0 * np.pi * fx
            c = cross[y, x] * rot_y * rot_x[x]
            mag = abs(c)
            if mag == 0.0:
                continue
            wt = mag if (x == 0 or 2 * x == full_w) else 2.0 * mag
            phi = math.atan2(c.imag, c.real)
            syy += wt * uy * uy
            syx += wt * uy * ux
            sxx += wt * ux * ux
            by -= wt * uy * phi
            bx -= wt * ux * phi
    det = syy * sxx - syx * syx
    if det <= 0.0:
        return np.nan, np.nan
    return (by * sxx - bx * syx) / det, (bx * syy - by * syx) / det


class PhaseCorrelator:
    """Phase correlation of ROIs of one shape against a stored reference spectrum.

    Configure once per shape; :meth:`shift_spectra` reuses spectra, so a live tracker pays one
    forward FFT per frame. Calls share no scratch.

    Parameters
    ----------
    shape : tuple of int
        ROI shape ``(rows, cols)``, each at least 8.
    """

    def __init__(self, shape: tuple[int, int]):
        self.windowed = WindowedSpectrum(shape)
        self.shape = self.windowed.shape

    def spectrum(self, image: np.ndarray) -> np.ndarray:
        """Windowed ``rfft2`` of ``image`` (see :class:`stream.psd.WindowedSpectrum`)."""
        return self.windowed(image)[0]

    def shift_spectra(self, spec_ref: np.ndarray,
                      spec_img: np.ndarray) -> tuple[float, float, float]:
        """Shift of the image behind ``spec_img`` relative to the one behind ``spec_ref``.

        Returns
        -------
        dy, dx : float
            Shift in pixels (module sign convention), NaN if the spectra carry no signal.
        peak : float
            Height of the normalised correlation peak, in [0, 1] (1 = identical up to a
            shift); compare with :func:`min_significant_peak`.
        """
        if spec_ref.shape != spec_img.shape:
            raise ValueError(f"spectra differ in shape: {spec_ref.shape} vs {spec_img.shape}")
        h, w = self.shape
        cross = np.empty_like(spec_img)
        normalized = np.empty_like(spec_img)
        _cross_power(spec_img, spec_ref, cross, normalized)
        surface = scipy.fft.irfft2(normalized, s=self.shape, workers=1)
        iy, ix = np.unravel_index(int(np.argmax(surface)), surface.shape)
        peak = float(surface[iy, ix])
        py = iy - h if iy > h // 2 else iy
        px = ix - w if ix > w // 2 else ix
        sub_y, sub_x = _phase_plane(cross, w, float(py), float(px))
        return float(py + sub_y), float(px + sub_x), peak


def min_significant_peak(shape: tuple[int, int]) -> float:
    """Smallest phase-correlation peak that is not chance, ``PEAK_SIGMAS / √(rows·cols)``."""
    return PEAK_SIGMAS / math.sqrt(shape[0] * shape[1])


def phase_correlation_shift(ref: np.ndarray, img: np.ndarray) -> tuple[float, float, float]:
    """Sub-pixel shift of ``img`` relative to ``ref`` by phase correlation.

    Parameters
    ----------
    ref, img : array_like, shape (rows, cols)
        Same shape, each side at least 8; any integer or float dtype; non-finite pixels are
        replaced by the finite mean. Not modified.

    Returns
    -------
    dy, dx : float
        ``img[y, x] ≈ ref[y − dy, x − dx]``, pixels; shifts beyond half the ROI alias.
    peak : float
        Normalised correlation peak in [0, 1]; below :func:`min_significant_peak` the shift is
        chance.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> ref = rng.random((64, 64))
    >>> dy, dx, peak = phase_correlation_shift(ref, np.roll(ref, (3, -5), axis=(0, 1)))
    >>> round(dy), round(dx)
    (3, -5)
    """
    a = np.asarray(ref)
    b = np.asarray(img)
    if a.shape != b.shape:
        raise ValueError(f"ref and img differ in shape: {a.shape} vs {b.shape}")
    if a.ndim != 2:
        raise ValueError(f"ref and img must be 2-D, got shape {a.shape}")
    corr = PhaseCorrelator(a.shape)
    return corr.shift_spectra(corr.spectrum(a), corr.spectrum(b))


def fourier_shift_image(image: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """Shift ``image`` by ``(dy, dx)`` pixels with a Fourier phase ramp (band-limited, circular).

    ``out[y, x] = image[y − dy, x − dx]``; content leaving one side re-enters on the other.
    Unlike bilinear interpolation this keeps every spatial frequency, so registration does not
    blur. Non-finite pixels must be filled by the caller.

    Parameters
    ----------
    image : ndarray, shape (rows, cols)
    dy, dx : float
        Shift, pixels.

    Returns
    -------
    ndarray of float32, shape (rows, cols)
    """
    h, w = image.shape
    spec = scipy.fft.rfft2(np.asarray(image, dtype=np.float32), workers=1)
    ramp_y = np.exp(-2j * np.pi * np.fft.fftfreq(h) * dy).astype(np.complex64)
    ramp_x = np.exp(-2j * np.pi * np.fft.rfftfreq(w) * dx).astype(np.complex64)
    spec *= ramp_y[:, None]
    spec *= ramp_x[None, :]
    return scipy.fft.irfft2(spec, s=(h, w), workers=1).astype(np.float32, copy=False)


class JitterTracker:
    """Vibration (jitter) RMS over a sliding window of frame-to-frame shifts.

    Frame-to-frame shifts are integrated into a position track; over the last ``window`` shifts
    a straight line per axis (steady drift: thermal, stage creep) is removed by least squares
    and the RMS of what is left is the jitter. Without the detrend a slow drift would read as
    vibration; without integrating (RMS of the shifts themselves) a slow wander would be
    missed and uncorrelated jitter would read √2 too high.

    Parameters
    ----------
    window : int
        Number of most recent shifts used (≥ 3).
    """

    MIN_SHIFTS = 3
    """Shifts needed before a jitter value is reported (a line through 4 positions)."""

    def __init__(self, window: int = 50):
        if isinstance(window, bool) or int(window) != window or window < self.MIN_SHIFTS:
            raise ValueError(f"window must be an integer >= {self.MIN_SHIFTS}, got {window!r}")
        self.window = int(window)
        self._pos = deque(maxlen=self.window + 1)

    def reset(self) -> None:
        """Forget the track (after a commanded move, or a frame whose shift is unknown)."""
        self._pos.clear()

    def update(self, dy_px: float, dx_px: float, pixel_nm: float) -> float | None:
        """Add one frame-to-frame shift and return the current jitter RMS, nm (or None).

        Parameters
        ----------
        dy_px, dx_px : float
            Shift of the new frame relative to the previous one, pixels.
        pixel_nm : float
            Pixel size at the sample, nm.
        """
        if not (math.isfinite(dy_px) and math.isfinite(dx_px)):
            raise ValueError(f"shift must be finite, got ({dy_px}, {dx_px})")
        if not (math.isfinite(pixel_nm) and pixel_nm > 0):
            raise ValueError(f"pixel_nm must be a positive number, got {pixel_nm}")
        if not self._pos:
            self._pos.append((0.0, 0.0))
        y, x = self._pos[-1]
        self._pos.append((y + dy_px * pixel_nm, x + dx_px * pixel_nm))
        return self.rms_nm

    @property
    def n_shifts(self) -> int:
        """Shifts currently in the window."""
        return max(len(self._pos) - 1, 0)

    def _residuals(self) -> np.ndarray | None:
        """Track minus its least-squares straight line per axis, shape (n, 2), nm."""
        if self.n_shifts < self.MIN_SHIFTS:
            return None
        pos = np.asarray(self._pos)
        t = np.arange(pos.shape[0], dtype=np.float64)
        t -= t.mean()
        centred = pos - pos.mean(axis=0)
        slope = (t @ centred) / (t @ t)
        return centred - t[:, None] * slope[None, :]

    @property
    def rms_nm(self) -> float | None:
        """2-D jitter RMS, ``√⟨ry² + rx²⟩`` of the detrended track, nm (None until 3 shifts)."""
        res = self._residuals()
        return None if res is None else float(np.sqrt(np.mean(np.sum(res**2, axis=1))))

    @property
    def rms_yx_nm(self) -> tuple[float, float] | None:
        """Jitter RMS along y and along x, nm (None until 3 shifts)."""
        res = self._residuals()
        if res is None:
            return None
        ry, rx = np.sqrt(np.mean(res**2, axis=0))
        return float(ry), float(rx)


class RegisteredAverager:
    """Average a block of frames after registering each onto the first.

    Each frame's shift relative to the first is measured by phase correlation on the central
    ``estimate_px × estimate_px`` crop (rigid translation, so the crop suffices and keeps the
    cost down on 2048² frames), then the frame is moved back with a Fourier phase ramp
    (:func:`fourier_shift_image`; bilinear interpolation would blur the very resolution that
    registration is meant to keep). Pixels that wrapped around the border, or that were not
    finite, are left out of the mean for that frame: the result is the mean of the valid
    contributions per pixel.

    Parameters
    ----------
    shape : tuple of int
        Frame shape ``(rows, cols)``.
    estimate_px : int or None
        Side of the central crop used to measure shifts (None = whole frame).
    """

    def __init__(self, shape: tuple[int, int], estimate_px: int | None = 512):
        shape = tuple(int(n) for n in shape)
        if len(shape) != 2 or min(shape) < 8:
            raise ValueError(f"shape must be (rows, cols) with both >= 8, got {shape}")
        if estimate_px is not None and estimate_px < 8:
            raise ValueError(f"estimate_px must be >= 8 or None, got {estimate_px}")
        self.shape = shape
        side = (shape[0], shape[1]) if estimate_px is None else (
            min(shape[0], int(estimate_px)), min(shape[1], int(estimate_px)))
        y0 = (shape[0] - side[0]) // 2
        x0 = (shape[1] - side[1]) // 2
        self._crop = (slice(y0, y0 + side[0]), slice(x0, x0 + side[1]))
        self._corr = PhaseCorrelator(side)
        self._sum = np.zeros(shape)
        self._count = np.zeros(shape, dtype=np.int64)
        self._ref_spec: np.ndarray | None = None
        self.shifts: list[tuple[float, float, float]] = []
        """``(dy, dx, peak)`` of each added frame relative to the first."""

    @property
    def n_frames(self) -> int:
        return len(self.shifts)

    def reset(self) -> None:
        """Start a new block."""
        self._sum[:] = 0.0
        self._count[:] = 0
        self._ref_spec = None
        self.shifts = []

    def add(self, frame: np.ndarray) -> tuple[float, float, float]:
        """Register ``frame`` onto the block's first frame and accumulate it.

        Returns
        -------
        dy, dx, peak : float
            Shift of ``frame`` relative to the first frame (0, 0, 1 for the first itself).
        """
        arr = np.asarray(frame)
        if arr.shape != self.shape:
            raise ValueError(f"frame shape {arr.shape} does not match {self.shape}")
        if arr.dtype.kind not in "uif":
            raise TypeError(f"frame must have an integer or float dtype, got {arr.dtype}")
        spec = self._corr.spectrum(arr[self._crop])
        finite = np.isfinite(arr)
        if self._ref_spec is None:
            self._ref_spec = spec
            shift = (0.0, 0.0, 1.0)
            self._sum += np.where(finite, arr, 0.0)
            self._count += finite
        else:
            dy, dx, peak = self._corr.shift_spectra(self._ref_spec, spec)
            if not (math.isfinite(dy) and math.isfinite(dx)):
                raise ValueError("frame has no structure to register (flat or non-finite)")
            shift = (dy, dx, peak)
            fill = float(arr[finite].mean()) if finite.any() else 0.0
            moved = fourier_shift_image(np.where(finite, arr, fill), -dy, -dx)
            valid = _shifted_mask(finite, -dy, -dx)
            self._sum += np.where(valid, moved, 0.0)
            self._count += valid
        self.shifts.append(shift)
        return shift

    def mean(self) -> np.ndarray:
        """Registered mean so far, float32, NaN where no frame contributed."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self._count > 0, self._sum / self._count, np.nan).astype(np.float32)


def _shifted_mask(mask: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """``mask`` moved by the rounded shift, false where content wrapped or came from outside.

    A Fourier shift by a fractional amount spreads each pixel over its neighbours, so the
    border strip is ``ceil(|shift|)`` wide and a non-finite pixel also spoils both rounded
    neighbours: the mask is shifted by ``floor`` and ``ceil`` and both must hold.
    """
    h, w = mask.shape
    out = np.ones_like(mask, dtype=bool)
    for sy in {math.floor(dy), math.ceil(dy)}:
        for sx in {math.floor(dx), math.ceil(dx)}:
            moved = np.zeros_like(mask, dtype=bool)
            src = mask[max(0, -sy):h - max(0, sy), max(0, -sx):w - max(0, sx)]
            moved[max(0, sy):max(0, sy) + src.shape[0], max(0, sx):max(0, sx) + src.shape[1]] = src
            out &= moved
    return out


def register_average(frames: Iterable[np.ndarray], estimate_px: int | None = 512) -> np.ndarray:
    """Mean of ``frames`` after registering each onto the first (see
    :class:`RegisteredAverager`).

    Parameters
    ----------
    frames : iterable of ndarray, each shape (rows, cols)
        At least one frame, all the same shape.
    estimate_px : int or None
        Side of the central crop used to measure shifts.

    Returns
    -------
    ndarray of float32, shape (rows, cols)
        Registered mean, NaN where no frame contributed.
    """
    averager: RegisteredAverager | None = None
    for frame in frames:
        if averager is None:
            averager = RegisteredAverager(np.shape(frame), estimate_px)
        averager.add(frame)
    if averager is None:
        raise ValueError("register_average needs at least one frame")
    return averager.mean()
