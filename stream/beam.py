"""Beam position, intensity and illumination quality from full-field frames.

* :func:`bin_image` — NaN-aware block mean, used for previews and for the beam metrics.
* :func:`beam_stats` — intensity-weighted centroid (px and µm at the sample), total and mean
  counts.
* :func:`illumination_uniformity` — coefficient of variation of the smoothed field inside the
  illuminated field of view.
* :func:`flat_repeatability` — how much the flat-field pattern changed between two flats.

Coordinates: ``y`` is the row index (down), ``x`` the column index (right); pixel centres are
at integer indices. Positions in µm are relative to the frame centre ``((rows−1)/2, (cols−1)/2)``
(the nominal optical axis), scaled by the pixel size at the sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from stream.psd import FAST, kernel_array


@dataclass(frozen=True)
class BeamStats:
    """Centroid and counts of one frame.

    Attributes
    ----------
    centroid_y_px, centroid_x_px : float
        Intensity-weighted centroid, pixels of the image given (NaN if no positive weight).
    centroid_y_um, centroid_x_um : float or None
        Centroid relative to the frame centre, µm at the sample (None without ``pixel_nm``).
    total_counts : float
        Sum of the finite pixels.
    mean_counts : float
        Mean of the finite pixels (NaN if none).
    n_finite : int
        Number of finite pixels.
    """

    centroid_y_px: float
    centroid_x_px: float
    centroid_y_um: float | None
    centroid_x_um: float | None
    total_counts: float
    mean_counts: float
    n_finite: int


@njit(nogil=True, cache=True, fastmath=FAST)
def _bin_mean(image, factor, out):  # pragma: no cover - compiled
    """Block means of finite pixels into ``out``; returns ``(sum, count)`` of all finite pixels.

    For each block row the ``factor`` image rows are summed column by column with plain adds
    (a contiguous loop that vectorises and runs at memory bandwidth), then the column sums are
    reduced in groups of ``factor``. A non-finite pixel makes its column sum non-finite; only
    then is that block row summed again the careful way, skipping non-finite pixels and
    counting the rest (``|v| < inf`` tests finiteness). Blocks with no finite pixel are NaN.
    Pixels past the last full block count in the totals.
    """
    h, w = image.shape
    oh, ow = out.shape
    # float32 column sums of ``factor`` rows: twice the SIMD width of float64, and a sum of a
    # few pixels loses nothing that matters (relative error ~1e-7); totals are float64.
    col_sum = np.empty(w, dtype=np.float32)
    col_n = np.empty(w, dtype=np.int64)
    total = 0.0
    n = 0
    for by in range((h + factor - 1) // factor):
        y0 = by * factor
        y1 = min(y0 + factor, h)
        col_sum[:] = 0.0
        for y in range(y0, y1):
            for x in range(w):
                col_sum[x] += np.float32(image[y, x])
        col_n[:] = y1 - y0
        clean = True
        for x in range(w):
            v = col_sum[x]
            if not abs(v) < np.inf:
                clean = False
        if not clean:
            col_sum[:] = 0.0
            col_n[:] = 0
            for y in range(y0, y1):
                for x in range(w):
                    v = np.float32(image[y, x])
                    if abs(v) < np.inf:
                        col_sum[x] += v
                        col_n[x] += 1
        for x in range(w):
            total += np.float64(col_sum[x])
            n += col_n[x]
        if by < oh:
            for bx in range(ow):
                s = 0.0
                c = 0
                for x in range(bx * factor, (bx + 1) * factor):
                    s += np.float64(col_sum[x])
                    c += col_n[x]
                out[by, bx] = s / c if c > 0 else np.nan
    return total, n


@njit(nogil=True, cache=True, fastmath=FAST)
def _weighted_centroid(image, background):  # pragma: no cover - compiled
    """``(Σw·y, Σw·x, Σw, Σv, n)`` with ``w = max(v − background, 0)`` over finite ``v``."""
    h, w = image.shape
    sy = 0.0
    sx = 0.0
    sw = 0.0
    sv = 0.0
    n = 0
    for y in range(h):
        r_x = 0.0
        r_w = 0.0
        for x in range(w):
            v = np.float64(image[y, x])
            ok = abs(v) < np.inf
            sv += v if ok else 0.0
            n += ok
            wt = v - background
            wt = wt if (ok and wt > 0.0) else 0.0
            r_x += wt * x
            r_w += wt
        sy += r_w * y
        sx += r_x
        sw += r_w
    return sy, sx, sw, sv, n


@njit(nogil=True, cache=True, fastmath=FAST)
def _smooth_nan(image, taps, out):  # pragma: no cover - compiled
    """Separable normalised convolution: ``out = G*(I·v) / G*v``, zero padding, NaN where
    ``G*v ≤ 1e-6``.

    float32 intermediates (relative error ~1e-7, ample for an illumination map) and loops with
    taps outside and contiguous pixels inside, indexed only by non-negative loop counters (a
    row padded by the kernel radius), so numba drops its wrap-around checks and vectorises.
    """
    h, w = image.shape
    n_taps = taps.size
    r = (n_taps - 1) // 2
    num = np.empty((h, w), dtype=np.float32)
    den = np.empty((h, w), dtype=np.float32)
    vals = np.zeros(w + 2 * r, dtype=np.float32)
    mask = np.zeros(w + 2 * r, dtype=np.float32)
    acc_n = np.empty(w, dtype=np.float32)
    acc_d = np.empty(w, dtype=np.float32)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for y in range(h):
        for x in range(w):
            v = np.float32(image[y, x])
            ok = abs(v) < np.inf
            vals[x + r] = v if ok else zero
            mask[x + r] = one if ok else zero
        acc_n[:] = 0.0
        acc_d[:] = 0.0
        for k in range(n_taps):
            g = np.float32(taps[k])
            for x in range(w):
                acc_n[x] += g * vals[x + k]
                acc_d[x] += g * mask[x + k]
        for x in range(w):
            num[y, x] = acc_n[x]
            den[y, x] = acc_d[x]
    for y in range(h):
        acc_n[:] = 0.0
        acc_d[:] = 0.0
        for k in range(max(0, r - y), min(n_taps, h + r - y)):
            g = np.float32(taps[k])
            yy = y + k - r
            for x in range(w):
                acc_n[x] += g * num[yy, x]
                acc_d[x] += g * den[yy, x]
        for x in range(w):
            out[y, x] = acc_n[x] / acc_d[x] if acc_d[x] > 1e-6 else np.nan


@njit(nogil=True, cache=True, fastmath=FAST)
def _fov_cv(smooth, fov_fraction):  # pragma: no cover - compiled
    """``std / mean`` of the finite values ``≥ fov_fraction × max``; NaN if the max is not > 0.

    One pass for the maximum, one for shifted sums: deviations are taken from the maximum,
    which lies within a factor ``1/fov_fraction`` of every value inside, so the variance does
    not suffer the cancellation of raw sums of squares.
    """
    h, w = smooth.shape
    peak = -np.inf
    for y in range(h):
        for x in range(w):
            v = smooth[y, x]
            if abs(v) < np.inf and v > peak:
                peak = v
    if not peak > 0.0:
        return np.nan
    level = fov_fraction * peak
    shift = peak
    n = 0
    s1 = 0.0
    s2 = 0.0
    for y in range(h):
        for x in range(w):
            v = smooth[y, x]
            ok = abs(v) < np.inf and v >= level
            d = v - shift if ok else 0.0
            s1 += d
            s2 += d * d
            n += ok
    mean_d = s1 / n
    return math.sqrt(max(s2 / n - mean_d * mean_d, 0.0)) / (shift + mean_d)


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, cols), got shape {arr.shape}")
    if arr.dtype.kind not in "uif":
        raise TypeError(f"{name} must have an integer or float dtype, got {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _check_factor(factor: int, shape: tuple[int, ...]) -> int:
    if isinstance(factor, bool) or int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    factor = int(factor)
    if factor > min(shape):
        raise ValueError(f"factor {factor} is larger than the image {shape}")
    return factor


def bin_image_and_totals(image: np.ndarray, factor: int,
                         out: np.ndarray | None = None) -> tuple[np.ndarray, float, int]:
    """:func:`bin_image` plus the sum and count of all finite pixels, in the same pass.

    Returns
    -------
    binned : ndarray of float32, shape (rows // factor, cols // factor)
    total_counts : float
        Sum of all finite pixels of ``image`` (including any trailing rows/columns).
    n_finite : int
    """
    arr = _check_image(image)
    factor = _check_factor(factor, arr.shape)
    shape = (arr.shape[0] // factor, arr.shape[1] // factor)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype.kind != "f" or not out.flags.writeable:
        raise ValueError(f"out must be a writeable float array of shape {shape}, got "
                         f"{out.dtype} {out.shape}")
    total, n = _bin_mean(kernel_array(arr), factor, out)
    return out, float(total), int(n)


def bin_image(image: np.ndarray, factor: int, out: np.ndarray | None = None) -> np.ndarray:
    """NaN-aware block mean of ``factor × factor`` pixels.

    Parameters
    ----------
    image : array_like, shape (rows, cols)
        Any integer or float dtype; not modified.
    factor : int
        Block size in pixels (≥ 1). Trailing rows/columns that do not fill a block are dropped.
    out : ndarray of float, shape (rows // factor, cols // factor), optional
        Destination (reused between frames to avoid an allocation).

    Returns
    -------
    ndarray of float32 (or ``out``'s dtype), shape (rows // factor, cols // factor)
        Mean of the finite pixels of each block; NaN where a block has none.
    """
    return bin_image_and_totals(image, factor, out)[0]


def binned_to_full_px(coord_px: float, factor: int) -> float:
    """Map a pixel coordinate on a frame binned by ``factor`` to the unbinned frame.

    Block ``j`` covers full-frame pixels ``j·factor … j·factor + factor − 1``, whose centre is
    ``(j + 0.5)·factor − 0.5``.
    """
    return (coord_px + 0.5) * factor - 0.5


def beam_stats(image: np.ndarray, pixel_nm: float | None = None, *,
               background: float = 0.0) -> BeamStats:
    """Intensity-weighted centroid, total and mean counts of a frame.

    Parameters
    ----------
    image : array_like, shape (rows, cols)
        Counts (raw or dark-subtracted) or corrected intensity; non-finite pixels ignored.
    pixel_nm : float, optional
        Pixel size at the sample of ``image``, nm, for the centroid in µm.
    background : float, optional
        Subtracted before weighting, and weights below zero are clipped to zero, so a uniform
        background (dark level, scattered light) does not pull the centroid to the frame centre.

    Returns
    -------
    BeamStats
    """
    arr = _check_image(image)
    if pixel_nm is not None and not (np.isfinite(pixel_nm) and pixel_nm > 0):
        raise ValueError(f"pixel_nm must be a positive number or None, got {pixel_nm}")
    sy, sx, sw, sv, n = _weighted_centroid(kernel_array(arr), float(background))
    cy = sy / sw if sw > 0 else math.nan
    cx = sx / sw if sw > 0 else math.nan
    cy_um = cx_um = None
    if pixel_nm is not None:
        cy_um = (cy - 0.5 * (arr.shape[0] - 1)) * pixel_nm * 1e-3
        cx_um = (cx - 0.5 * (arr.shape[1] - 1)) * pixel_nm * 1e-3
    return BeamStats(
        centroid_y_px=cy, centroid_x_px=cx, centroid_y_um=cy_um, centroid_x_um=cx_um,
        total_counts=float(sv), mean_counts=sv / n if n else math.nan, n_finite=int(n),
    )


def gaussian_kernel(sigma_px: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps, truncated at 4σ as :func:`scipy.ndimage.gaussian_filter1d`.

    Returns
    -------
    ndarray of float64, shape (2·round(4σ) + 1,)
    """
    radius = int(4.0 * sigma_px + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma_px) ** 2)
    return taps / taps.sum()


def smooth_nan(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing that ignores non-finite pixels (normalised convolution).

    ``G*(I·v) / G*v`` with ``v`` the finite-pixel mask and zero outside the image, so neither
    dead pixels nor the image border bias the result. Pixels with no finite neighbour within
    the kernel (``G*v ≤ 1e-6``) are NaN.

    Parameters
    ----------
    image : array_like, shape (rows, cols)
    sigma_px : float
        Gaussian standard deviation, pixels (> 0); taps as :func:`gaussian_kernel`.

    Returns
    -------
    ndarray of float64, shape (rows, cols)
    """
    arr = _check_image(image)
    if not (np.isfinite(sigma_px) and sigma_px > 0):
        raise ValueError(f"sigma_px must be positive, got {sigma_px}")
    out = np.empty(arr.shape)
    _smooth_nan(kernel_array(arr), gaussian_kernel(float(sigma_px)), out)
    return out


def illumination_uniformity(image: np.ndarray, sigma_px: float = 0.5,
                            fov_fraction: float = 0.5) -> float:
    """Coefficient of variation of the smoothed illumination inside the field of view.

    The image is smoothed by a Gaussian of ``sigma_px`` (NaN-aware, :func:`smooth_nan`) so that
    photon noise and fine sample structure do not count as non-uniformity. The field of view is
    the set of pixels where the smoothed field is at least ``fov_fraction`` of its maximum: the
    illuminated disc of the condenser, excluding dark corners and the beam stop's shadow. On a
    binned frame ``sigma_px`` is in binned pixels.

    Parameters
    ----------
    image : array_like, shape (rows, cols)
        Raw counts or a flat; non-finite pixels ignored.
    sigma_px : float
        Smoothing standard deviation, pixels.
    fov_fraction : float
        Field-of-view threshold as a fraction of the smoothed maximum, in (0, 1).

    Returns
    -------
    float
        ``std / mean`` of the smoothed field inside the field of view (0 = perfectly uniform);
        NaN when the smoothed field has no positive maximum.
    """
    if not 0.0 < fov_fraction < 1.0:
        raise ValueError(f"fov_fraction must be in (0, 1), got {fov_fraction}")
    return float(_fov_cv(smooth_nan(image, sigma_px), fov_fraction))


def flat_repeatability(flat_a: np.ndarray, flat_b: np.ndarray, *, sigma_px: float = 0.0,
                       fov_fraction: float = 0.5) -> float:
    """RMS change of the flat-field pattern between two flats.

    ``rms(r − 1)`` with ``r = (b / mean(b)) / (a / mean(a))`` over the pixels where both flats
    are finite and inside the field of view (both at least ``fov_fraction`` of their maximum).
    Dividing by the means removes a global intensity change (ring current, exposure), which
    flat-field correction absorbs anyway; what is left is a change of the *pattern* (condenser
    or shaker drift, scintillator), which correction cannot fix.

    With ``sigma_px = 0`` the result includes photon noise, ``≈ √(1/N_a + 1/N_b)`` for ``N``
    counts per pixel; smooth (``sigma_px`` a few pixels, NaN-aware) to see structural changes
    at the scale of the illumination only.

    Parameters
    ----------
    flat_a, flat_b : array_like, shape (rows, cols)
        Consecutive flats (same shape).
    sigma_px : float, optional
        Gaussian smoothing applied to both flats first, pixels (0 = none).
    fov_fraction : float, optional
        Field-of-view threshold, as in :func:`illumination_uniformity`.

    Returns
    -------
    float
        Dimensionless RMS (0.01 = 1 % pattern change); NaN if no pixel qualifies.
    """
    a = _check_image(flat_a, "flat_a")
    b = _check_image(flat_b, "flat_b")
    if a.shape != b.shape:
        raise ValueError(f"flats differ in shape: {a.shape} vs {b.shape}")
    if not 0.0 < fov_fraction < 1.0:
        raise ValueError(f"fov_fraction must be in (0, 1), got {fov_fraction}")
    if sigma_px < 0:
        raise ValueError(f"sigma_px must be >= 0, got {sigma_px}")
    if sigma_px > 0:
        a, b = smooth_nan(a, sigma_px), smooth_nan(b, sigma_px)
    a = a.astype(np.float64, copy=False)
    b = b.astype(np.float64, copy=False)
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        return math.nan
    inside = ok & (a >= fov_fraction * a[ok].max()) & (b >= fov_fraction * b[ok].max())
    inside &= (a > 0) & (b > 0)
    if not inside.any():
        return math.nan
    ra = a[inside] / a[inside].mean()
    rb = b[inside] / b[inside].mean()
    return float(np.sqrt(np.mean((rb / ra - 1.0) ** 2)))
