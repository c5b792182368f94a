"""Radial power spectral density (PSD), PSD resolution, band power and NA fill.

The resolution is measured the way full-field TXM beamlines quote it from a Siemens star (the
SSRF BL18B commissioning among them): 2-D FFT of the image, azimuthal average of the power
spectrum at each radial spatial frequency, and the cut-off frequency ``f_c`` where the signal
meets the noise floor; the half-period resolution is ``1 / (2 f_c)`` (25 µm⁻¹ → 20 nm).

Conventions (all documented once here):

* **Window**: a separable 2-D Hann window. It goes smoothly to zero on all four ROI borders, so
  the jump between opposite borders (which the FFT treats as neighbours) cannot leak a cross of
  ``f⁻²`` power into the spectrum. That leak lies along the ``kx`` and ``ky`` axes and would
  fake high-frequency "signal" exactly where the x and y cut-offs are measured, pushing the
  reported resolution up dishonestly. A Tukey window keeps more of the ROI at full weight, but
  its shorter taper leaks more; Hann down-weights the ROI border instead, acceptable for a live
  metric of the field centre.
* **Detrending and normalisation**: ``psd = |FFT(w·(I − P))|² / Σw²`` with ``P`` the
  ``w²``-weighted least-squares plane (offset and tilt) of the ROI, so white noise of per-pixel
  variance ``σ²`` reads ``σ²`` (for Poisson noise the floor equals the mean counts). Removing
  the plane, not just the mean, keeps an illumination tilt out of the lowest bins, where it
  would otherwise read as structure.
* **Non-finite pixels** (dead pixels after dark/flat correction) are replaced by the mean of the
  finite pixels of the ROI before anything else and counted in ``n_nonfinite``.
* **Frequencies**: ``f = k / (N · pixel)`` in µm⁻¹ along each axis, radial ``|f|`` binned with
  the coarser of the two axis steps ``df``; bin ``i`` (``i = 1 … N_min/2``) holds
  ``round(|f| / df) = i``. Nyquist ``= 1 / (2 · pixel_nm · 1e-3)`` µm⁻¹. DC is excluded.
* **Noise floor**: median of the radial PSD over the bins at or above ``0.8 × Nyquist``
  (photon noise is white, so the top band holds noise only when the image is resolved below it).
* **Cut-off criterion**: on the smoothed PSD (running mean of ``ln psd`` over 5 bins), from bin
  :data:`MIN_BIN` up to the floor band, find the runs of bins above ``threshold × floor``
  (default 2: signal power equals noise power) and keep the significant ones
  (:data:`Z_DETECT`). Scanning from low to high frequency, ``f_c`` is where the first
  significant run falls to ``threshold × floor`` — unless a later significant run is broad
  (:data:`LATE_RUN_BINS`, :data:`LATE_RUN_REL`), i.e. the image content resumes after a dip
  in the sample's own spectrum; then ``f_c`` is where the last such run falls. For a PSD that
  falls monotonically this is simply the first frequency where it falls to the threshold. The
  crossing is interpolated linearly in ``ln psd`` between the two bins that bracket it.
* **Uncertainty** of ``f_c`` (1σ, statistical, added in quadrature):

  - bin quantisation: ``df / √12``;
  - floor: relative standard error of the median of the floor band,
    ``1.2533 · 1.4826 · MAD / (floor · √(n_floor_bins / c₁))``;
  - local PSD scatter at the crossing: ``1 / √(Σ n_eff)`` over the smoothing span, with
    ``n_eff`` the number of independent Fourier coefficients per bin: ``count / 2``
    (conjugate pairs) divided by ``c₂ = N·Σw⁴ / (Σw²)²`` (3.8 for the 2-D Hann window: a
    windowed periodogram averaged over neighbouring frequencies has that many times fewer
    degrees of freedom than coefficients; ``c₁ = √c₂`` is the same along one axis);

  both relative terms are turned into a frequency error through the local log-slope
  ``|d ln S / df|`` of the smoothed PSD at the crossing. The choice of ``threshold`` is a
  systematic, not included.
* **Verdicts**: ``"resolved"``; ``"no_signal"`` when no run of bins above ``threshold × floor``
  is significant — then no number is reported; ``"nyquist_limited"`` when the signal reaches
  the floor band (the run never falls to the threshold below ``0.8 × Nyquist``, or the floor
  band itself still falls faster than :data:`FLOOR_MIN_SLOPE`): then ``cutoff_per_um`` is the
  start of the floor band, a **lower bound**, ``resolution_nm`` the matching **upper bound**,
  and the errors are ``None``.
* **Band power**: the noise-subtracted PSD summed over the band and divided by
  ``rows · cols · mean²`` — the squared contrast (variance / mean²) of the image content in
  the band. Normalising by ``mean²`` rather than by the total power makes it independent of
  beam intensity and exposure (both scale signal power by ``mean²``), and subtracting the
  noise floor removes the ``1/dose`` photon-noise term, so its expectation does not depend on
  dose; normalising by the total power instead would tie it to low-frequency content
  (illumination, a particle entering the field) that has nothing to do with focus.
* **NA fill**: for partially coherent illumination the imaging cut-off is ``(1 + σ)·NA/λ``
  with ``NA/λ = 1/(2Δr)`` for a zone plate of outermost zone ``Δr``, so
  ``σ = 2·Δr·f_c − 1`` (``Δr`` in µm, ``f_c`` in µm⁻¹). It is meaningful only when the
  cut-off is set by the optics; a value near or below 0 means noise, defocus or vibration set
  it instead.

References
----------
.. [1] P. D. Welch, "The use of fast Fourier transform for the estimation of power spectra",
   IEEE Trans. Audio Electroacoust. 15, 70 (1967).
.. [2] F. J. Harris, "On the use of windows for harmonic analysis with the discrete Fourier
   transform", Proc. IEEE 66, 51 (1978) (window leakage; variance of averaged windowed
   spectra).
.. [3] J. W. Goodman, *Statistical Optics* and *Introduction to Fourier Optics* (partially
   coherent imaging, cut-off ``(1 + σ)·NA/λ``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft
from numba import njit

FLOOR_BAND_START = 0.8
"""The noise floor is measured on bins at or above this fraction of Nyquist."""

SMOOTH_HALF_BINS = 2
"""Half width of the running mean of ``ln psd`` (5 bins in all)."""

MIN_BIN = 4
"""Lowest radial bin searched for signal. Bins 1-3 (periods longer than a quarter of the ROI)
carry illumination gradients and the Hann window's main lobe; structure seen only there is
not resolvable image content, so it must not produce a resolution number."""

Z_DETECT = 5.0
"""A run of bins above the threshold counts as signal only if one of its bins exceeds the floor
by this many standard deviations of a pure-noise bin, ``(psd/floor − 1)·√n_eff``."""

FLOOR_MIN_SLOPE = -1.0
"""The floor band must be flat: if ``ln psd`` falls against ``ln f`` across it faster than
this (``psd ∝ f^slope`` with ``slope < −1``), the band still holds signal and the verdict is
``nyquist_limited``. White noise gives 0; image content falls as ``f⁻²…f⁻⁴``. A detector whose
MTF colours the noise strongly (MTF at Nyquist below ~0.6: slope −1 or steeper) is flagged too,
rightly: its floor cannot be read from one image (a frame difference would be needed)."""

LATE_RUN_BINS = 4 * SMOOTH_HALF_BINS + 2
LATE_RUN_REL = 0.2
"""A significant run above the threshold that starts after the first one extends the cut-off
only if it is broad: at least ``LATE_RUN_BINS`` bins and ``LATE_RUN_REL`` (20 %) in frequency.
Broad runs are image content past a dip in the sample's own spectrum (a Siemens star has one
between its disc and its spokes); narrow ones are periodic artefacts (detector pattern, stray
lines) that must not set the resolution."""

VERDICTS = ("resolved", "no_signal", "nyquist_limited")

FAST = {"reassoc", "contract", "arcp", "nsz"}
"""numba fast-math flags for reductions: reordering so loops vectorise, but never assuming
finite values (no ``nnan``/``ninf``), since the kernels test finiteness themselves, always as
``abs(v) < inf`` (a comparison; ``v − v == 0`` may be folded to true under ``reassoc``)."""

KERNEL_DTYPES = (np.dtype(np.uint16), np.dtype(np.float32), np.dtype(np.float64))
"""Pixel types the numba kernels are compiled for: raw detector frames, corrected frames, and
float64 for everything else."""


def kernel_array(arr: np.ndarray, fallback: type = np.float64) -> np.ndarray:
    """``arr`` as a C-contiguous array of a :data:`KERNEL_DTYPES` type (``fallback`` otherwise).

    numba vectorises only C-contiguous arrays (a ROI view of a frame is not one, and one copy
    is cheaper than a strided kernel), and compiles one specialisation per dtype, layout and
    writeability: funnelling every input into a few types keeps first-call compilation short.
    Read-only inputs (frames decoded zero-copy from the wire) are passed through as they are.
    """
    dtype = arr.dtype if arr.dtype in KERNEL_DTYPES else fallback
    return np.ascontiguousarray(arr, dtype=dtype)


@dataclass(frozen=True)
class PsdResult:
    """Radial PSD of one image and everything derived from it.

    Attributes
    ----------
    freqs_per_um : ndarray, shape (n_bins,)
        Bin centres in µm⁻¹, ``df, 2 df, …, Nyquist`` (read-only).
    psd : ndarray, shape (n_bins,)
        Azimuthally averaged power, counts² per pixel (white noise of variance σ² reads σ²).
    floor : float
        Noise floor, same unit as ``psd``.
    cutoff_per_um, cutoff_err_per_um : float or None
        Cut-off frequency and its 1σ error, µm⁻¹ (see the module notes and ``verdict``).
    resolution_nm, resolution_err_nm : float or None
        Half-period resolution ``1e3 / (2 f_c)`` and its 1σ error, nm.
    cutoff_x_per_um, cutoff_y_per_um : float or None
        Cut-off along x (columns) and y (rows), from the PSD in ±``wedge_deg`` wedges around the
        ``kx`` and ``ky`` axes; ``None`` unless that wedge is resolved or nyquist-limited.
    band_power : float or None
        Noise-subtracted power in the band, divided by ``H·W·mean²``: the squared contrast
        (variance / mean²) of the image content in the band. ``None`` when the mean is not
        positive.
    na_fill : float or None
        ``σ = 2·Δr·f_c − 1`` when ``dr_nm`` was given and the verdict is ``resolved``.
    verdict : str
        One of :data:`VERDICTS`.
    n_nonfinite : int
        Non-finite pixels replaced by the finite mean.
    """

    freqs_per_um: np.ndarray
    psd: np.ndarray
    floor: float
    cutoff_per_um: float | None
    cutoff_err_per_um: float | None
    resolution_nm: float | None
    resolution_err_nm: float | None
    cutoff_x_per_um: float | None
    cutoff_y_per_um: float | None
    band_power: float | None
    na_fill: float | None
    verdict: str
    n_nonfinite: int


@dataclass(frozen=True)
class _Cutoff:
    verdict: str
    cutoff_per_um: float | None
    cutoff_err_per_um: float | None
    floor: float


@dataclass(frozen=True)
class _Geometry:
    bin_idx: np.ndarray
    wedge: np.ndarray
    col_w: np.ndarray
    freqs: np.ndarray
    df: float
    counts: np.ndarray
    counts_x: np.ndarray
    counts_y: np.ndarray
    nyquist: float


@njit(nogil=True, cache=True, fastmath=FAST)
def _prepare(image, win_y, win_x, out):  # pragma: no cover - compiled
    """Fill non-finite pixels, subtract the ``w²``-weighted least-squares plane, apply window.

    Non-finite pixels take the plain mean of the finite ones. With centred coordinates and a
    symmetric window the normal equations of the plane decouple, so one pass of weighted sums
    gives its offset and both slopes. Returns ``(n_nonfinite, offset)``: ``offset`` is the
    ``w²``-weighted mean of the filled ROI; with no finite pixel it is NaN and ``out`` is 0.
    The per-pixel loops are branch-free (``|v| < inf`` tests finiteness) so they vectorise.
    """
    h, w = image.shape
    xc = np.arange(w) - 0.5 * (w - 1)
    wx2 = win_x * win_x
    wx2xc = wx2 * xc
    sum_wx2 = np.sum(wx2)
    n_finite = 0
    s_finite = 0.0
    # w²-weighted sums over finite pixels (v*) and over the non-finite ones (b*), which later
    # take the fill value.
    v0 = 0.0
    vy = 0.0
    vx = 0.0
    b0 = 0.0
    by = 0.0
    bx = 0.0
    for y in range(h):
        yc = y - 0.5 * (h - 1)
        wy2 = win_y[y] * win_y[y]
        r_n = 0
        r_s = 0.0
        r_0 = 0.0
        r_x = 0.0
        for x in range(w):
            v = np.float64(image[y, x])
            ok = abs(v) < np.inf
            vz = v if ok else 0.0
            r_n += ok
            r_s += vz
            r_0 += wx2[x] * vz
            r_x += wx2xc[x] * vz
        n_finite += r_n
        if r_n < w:
            # Rare: weights of this row's non-finite pixels, which take the fill value later.
            for x in range(w):
                v = np.float64(image[y, x])
                if not abs(v) < np.inf:
                    b0 += wy2 * wx2[x]
                    by += wy2 * yc * wx2[x]
                    bx += wy2 * wx2xc[x]
        s_finite += r_s
        v0 += wy2 * r_0
        vy += wy2 * yc * r_0
        vx += wy2 * r_x
    if n_finite == 0:
        out[:] = 0.0
        return h * w, np.nan
    s0 = 0.0
    syy = 0.0
    for y in range(h):
        wy2 = win_y[y] * win_y[y]
        yc = y - 0.5 * (h - 1)
        s0 += wy2
        syy += wy2 * yc * yc
    sxx = s0 * np.sum(wx2xc * xc)
    s0 *= sum_wx2
    syy *= sum_wx2
    fill = s_finite / n_finite
    m = (v0 + fill * b0) / s0
    a_y = (vy + fill * by) / syy
    a_x = (vx + fill * bx) / sxx
    for y in range(h):
        wy = win_y[y]
        base = m + a_y * (y - 0.5 * (h - 1))
        for x in range(w):
            v = np.float64(image[y, x])
            vf = v if abs(v) < np.inf else fill
            out[y, x] = (vf - base - a_x * xc[x]) * wy * win_x[x]
    return h * w - n_finite, m


@njit(nogil=True, cache=True)
def _radial_sums(spec, bin_idx, wedge, col_w, sums, sums_x, sums_y):  # pragma: no cover
    """Accumulate ``col_w · |spec|²`` per radial bin, overall and in the x / y wedges."""
    sums[:] = 0.0
    sums_x[:] = 0.0
    sums_y[:] = 0.0
    h, w = spec.shape
    for y in range(h):
        for x in range(w):
            b = bin_idx[y, x]
            if b < 0:
                continue
            c = spec[y, x]
            p = (c.real * c.real + c.imag * c.imag) * col_w[x]
            sums[b] += p
            wd = wedge[y, x]
            if wd == 1:
                sums_x[b] += p
            elif wd == 2:
                sums_y[b] += p


@lru_cache(maxsize=16)
def _geometry(shape: tuple[int, int], pixel_nm: float, wedge_deg: float) -> _Geometry:
    h, w = shape
    pixel_um = pixel_nm * 1e-3
    fy = np.fft.fftfreq(h, d=pixel_um)[:, None]
    fx = np.fft.rfftfreq(w, d=pixel_um)[None, :]
    df = max(1.0 / (h * pixel_um), 1.0 / (w * pixel_um))
    n_bins = min(h, w) // 2
    fr = np.hypot(fy, fx)
    k = np.rint(fr / df).astype(np.int64)
    bin_idx = np.where((k >= 1) & (k <= n_bins), k - 1, -1).astype(np.int32)
    tan_w = math.tan(math.radians(wedge_deg))
    in_x = np.abs(fy) <= tan_w * fx
    in_y = fx <= tan_w * np.abs(fy)
    wedge = np.where(in_x, 1, np.where(in_y, 2, 0)).astype(np.int8)
    # rfft2 keeps columns 0..w//2; all but column 0 (and the Nyquist column of an even width)
    # stand for themselves and their conjugate mirror in the full plane.
    col_w = np.full(fx.shape[1], 2.0)
    col_w[0] = 1.0
    if w % 2 == 0:
        col_w[-1] = 1.0
    weights = np.broadcast_to(col_w[None, :], bin_idx.shape)
    valid = bin_idx >= 0

    def count(mask: np.ndarray) -> np.ndarray:
        return np.bincount(bin_idx[mask], weights=weights[mask], minlength=n_bins)

    geo = _Geometry(
        bin_idx=bin_idx, wedge=wedge,
        col_w=col_w, freqs=df * np.arange(1, n_bins + 1), df=df,
        counts=count(valid), counts_x=count(valid & (wedge == 1)),
        counts_y=count(valid & (wedge == 2)), nyquist=0.5 / pixel_um,
    )
    for a in (geo.bin_idx, geo.wedge, geo.col_w, geo.freqs, geo.counts,
              geo.counts_x, geo.counts_y):
        a.setflags(write=False)
    return geo


def _smooth_log(psd: np.ndarray) -> np.ndarray:
    """Running mean of ``ln psd`` over ``2·SMOOTH_HALF_BINS + 1`` bins, truncated at the ends."""
    log_p = np.log(np.maximum(psd, np.finfo(np.float64).tiny))
    kernel = np.ones(2 * SMOOTH_HALF_BINS + 1)
    num = np.convolve(log_p, kernel, mode="same")
    den = np.convolve(np.ones_like(log_p), kernel, mode="same")
    return num / den


def _runs(mask: np.ndarray, start: int, stop: int) -> list[tuple[int, int]]:
    """``[begin, end)`` index ranges where ``mask`` is true, within ``[start, stop)``."""
    padded = np.concatenate(([False], mask[start:stop], [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(start + int(b), start + int(e)) for b, e in zip(edges[::2], edges[1::2],
                                                              strict=True)]


def _find_cutoff(freqs: np.ndarray, psd: np.ndarray, counts: np.ndarray, df: float,
                 nyquist: float, threshold: float, dof_factor: float) -> _Cutoff:
    """Noise floor, cut-off and verdict of one radial profile (see the module notes)."""
    n_bins = psd.size
    i_floor = int(np.searchsorted(freqs, FLOOR_BAND_START * nyquist - 1e-9 * df))
    band = psd[i_floor:]
    floor = float(np.median(band)) if band.size else math.nan
    if not np.isfinite(floor) or floor <= 0.0 or i_floor <= MIN_BIN:
        return _Cutoff("no_signal", None, None, floor)
    n_eff = np.maximum(counts / 2.0 / dof_factor, 1.0)
    smooth = np.exp(_smooth_log(psd))
    level = threshold * floor
    significant = [
        (b, e) for b, e in _runs(smooth > level, MIN_BIN - 1, i_floor)
        if np.max((psd[b:e] / floor - 1.0) * np.sqrt(n_eff[b:e])) >= Z_DETECT
    ]
    if not significant:
        return _Cutoff("no_signal", None, None, floor)
    last = significant[0]
    for b, e in significant[1:]:
        if e - b >= LATE_RUN_BINS and freqs[e - 1] >= (1.0 + LATE_RUN_REL) * freqs[b]:
            last = (b, e)
    log_f = np.log(freqs[i_floor:])
    log_f -= log_f.mean()
    band_slope = float(log_f @ np.log(np.maximum(band, floor * 1e-6)) / (log_f @ log_f))
    if last[1] == i_floor or band_slope < FLOOR_MIN_SLOPE:
        return _Cutoff("nyquist_limited", float(freqs[i_floor]), None, floor)
    lo, hi = last[1] - 1, last[1]
    l_lo, l_hi, l_t = math.log(smooth[lo]), math.log(smooth[hi]), math.log(level)
    f_c = float(freqs[lo] + (l_lo - l_t) / (l_lo - l_hi) * (freqs[hi] - freqs[lo]))
    log_slope = (l_lo - l_hi) / (freqs[hi] - freqs[lo])
    mad = float(np.median(np.abs(band - floor)))
    rel_floor = 1.2533 * 1.4826 * mad / floor / math.sqrt(band.size / math.sqrt(dof_factor))
    span = slice(max(hi - SMOOTH_HALF_BINS, 0), min(hi + SMOOTH_HALF_BINS + 1, n_bins))
    rel_local = 1.0 / math.sqrt(float(np.sum(n_eff[span])))
    err = math.sqrt(df**2 / 12.0 + (rel_floor**2 + rel_local**2) / log_slope**2)
    return _Cutoff("resolved", f_c, err, floor)


def _validate_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, cols), got shape {arr.shape}")
    if arr.dtype.kind not in "uif":
        raise TypeError(f"{name} must have an integer or float dtype, got {arr.dtype}")
    return arr


class WindowedSpectrum:
    """``rfft2`` of a ROI after filling non-finite pixels, removing a plane and Hann windowing.

    The step shared by the PSD (:class:`RadialPsd`) and phase correlation
    (:mod:`stream.vibration`). Configured once per shape; calls share no scratch, so one
    instance may serve several threads.

    Parameters
    ----------
    shape : tuple of int
        ROI shape ``(rows, cols)``, each at least 8.
    """

    def __init__(self, shape: tuple[int, int]):
        shape = tuple(int(n) for n in shape)
        if len(shape) != 2 or min(shape) < 8:
            raise ValueError(f"shape must be (rows, cols) with both >= 8, got {shape}")
        self.shape = shape
        self.win_y = np.hanning(shape[0])
        self.win_x = np.hanning(shape[1])
        self.win_y.setflags(write=False)
        self.win_x.setflags(write=False)
        self.win_sq_sum = float(np.sum(self.win_y**2) * np.sum(self.win_x**2))
        """``Σ w²`` over the ROI: divides ``|spec|²`` so white noise of variance σ² reads σ²."""
        self.dof_factor = float(shape[0] * shape[1] * np.sum(self.win_y**4) * np.sum(self.win_x**4)
                                / self.win_sq_sum**2)
        """``N·Σw⁴ / (Σw²)²``: Fourier coefficients per degree of freedom of a PSD average."""

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, int, float]:
        """Windowed spectrum of one ROI.

        Parameters
        ----------
        image : array_like, shape ``self.shape``
            Any integer or float dtype, non-finite pixels allowed; not modified.

        Returns
        -------
        spec : ndarray of complex64, shape (rows, cols // 2 + 1)
            ``rfft2(w · (I − plane))`` (float32 transform, one worker).
        n_nonfinite : int
            Pixels replaced by the mean of the finite ones.
        mean : float
            ``w²``-weighted mean of the filled ROI (the plane's offset); NaN if no pixel is
            finite.
        """
        arr = _validate_image(image)
        if arr.shape != self.shape:
            raise ValueError(f"image shape {arr.shape} does not match the configured "
                             f"{self.shape}")
        # Anything but raw uint16 becomes float32 (the transform is float32 anyway), so
        # _prepare is compiled for two pixel types only; see kernel_array for the contiguity.
        arr = kernel_array(arr, np.float32)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        buf = np.empty(self.shape, dtype=np.float32)
        n_bad, mean = _prepare(arr, self.win_y, self.win_x, buf)
        spec = scipy.fft.rfft2(buf, workers=1, overwrite_x=True)
        return spec, int(n_bad), float(mean)


class RadialPsd:
    """Radial PSD analyser configured once per ROI shape and pixel size, called per frame.

    Window, frequency bins, wedge masks and bin counts are computed at construction, so a call
    costs one pass to prepare the ROI, one ``rfft2`` (float32, one worker) and one binning pass.
    Calls are independent (no shared scratch), so one instance may serve several threads.

    Parameters
    ----------
    shape : tuple of int
        ROI shape ``(rows, cols)``, each at least 32.
    pixel_nm : float
        Pixel size at the sample, nm.
    threshold : float, optional
        Cut-off where the smoothed PSD falls to ``threshold × floor`` (> 1; 2 = SNR of 1).
    band_per_um : tuple of float, optional
        ``(lo, hi)`` band for :attr:`PsdResult.band_power`, µm⁻¹.
    dr_nm : float or None, optional
        Zone-plate outermost zone width, nm, for the NA-fill estimate.
    wedge_deg : float, optional
        Half opening of the wedges around the ``kx``/``ky`` axes for the x/y cut-offs, degrees.
    """

    def __init__(self, shape: tuple[int, int], pixel_nm: float, *, threshold: float = 2.0,
                 band_per_um: tuple[float, float] = (5.0, 15.0), dr_nm: float | None = None,
                 wedge_deg: float = 20.0):
        shape = tuple(int(n) for n in shape)
        if len(shape) != 2 or min(shape) < 32:
            raise ValueError(f"shape must be (rows, cols) with both >= 32, got {shape}")
        if not (np.isfinite(pixel_nm) and pixel_nm > 0):
            raise ValueError(f"pixel_nm must be a positive number, got {pixel_nm}")
        if not (np.isfinite(threshold) and threshold > 1.0):
            raise ValueError(f"threshold must be > 1 (a multiple of the floor), got {threshold}")
        lo, hi = (float(v) for v in band_per_um)
        if not (0.0 <= lo < hi):
            raise ValueError(f"band_per_um must be (lo, hi) with 0 <= lo < hi, got {band_per_um}")
        if dr_nm is not None and not (np.isfinite(dr_nm) and dr_nm > 0):
            raise ValueError(f"dr_nm must be a positive number or None, got {dr_nm}")
        if not (0.0 < wedge_deg < 45.0):
            raise ValueError(f"wedge_deg must be in (0, 45) so the wedges do not overlap, "
                             f"got {wedge_deg}")
        self.shape = shape
        self.pixel_nm = float(pixel_nm)
        self.threshold = float(threshold)
        self.band_per_um = (lo, hi)
        self.dr_nm = None if dr_nm is None else float(dr_nm)
        self.wedge_deg = float(wedge_deg)
        self._geo = _geometry(shape, self.pixel_nm, self.wedge_deg)
        self._windowed = WindowedSpectrum(shape)
        self._band = (self._geo.freqs >= lo) & (self._geo.freqs <= hi)

    @property
    def freqs_per_um(self) -> np.ndarray:
        """Bin centres, µm⁻¹, shape ``(min(shape) // 2,)``."""
        return self._geo.freqs

    def spectrum(self, image: np.ndarray) -> tuple[np.ndarray, int, float]:
        """Windowed spectrum of ``image``; see :meth:`WindowedSpectrum.__call__`."""
        return self._windowed(image)

    def profiles(self, spec: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Radial PSD overall, in the x wedge and in the y wedge, each shape ``(n_bins,)``."""
        g = self._geo
        n = g.freqs.size
        sums, sums_x, sums_y = np.empty(n), np.empty(n), np.empty(n)
        _radial_sums(spec, g.bin_idx, g.wedge, g.col_w, sums, sums_x, sums_y)
        norm = self._windowed.win_sq_sum
        with np.errstate(invalid="ignore", divide="ignore"):
            return sums / g.counts / norm, sums_x / g.counts_x / norm, sums_y / g.counts_y / norm

    def __call__(self, image: np.ndarray) -> PsdResult:
        """Analyse one ROI.

        Parameters
        ----------
        image : array_like, shape ``self.shape``
            Any integer or float dtype; not modified.

        Returns
        -------
        PsdResult
        """
        g = self._geo
        spec, n_bad, mean = self.spectrum(image)
        psd, psd_x, psd_y = self.profiles(spec)
        if not np.isfinite(mean):
            psd = np.full_like(psd, np.nan)
        dof = self._windowed.dof_factor
        main = _find_cutoff(g.freqs, psd, g.counts, g.df, g.nyquist, self.threshold, dof)
        cx = _find_cutoff(g.freqs, psd_x, g.counts_x, g.df, g.nyquist, self.threshold, dof)
        cy = _find_cutoff(g.freqs, psd_y, g.counts_y, g.df, g.nyquist, self.threshold, dof)
        f_c, f_err = main.cutoff_per_um, main.cutoff_err_per_um
        res = None if f_c is None else 1e3 / (2.0 * f_c)
        res_err = None if f_err is None else 1e3 * f_err / (2.0 * f_c**2)
        na_fill = None
        if self.dr_nm is not None and main.verdict == "resolved":
            na_fill = 2.0 * self.dr_nm * 1e-3 * f_c - 1.0
        band_power = None
        if np.isfinite(mean) and mean > 0 and np.isfinite(main.floor):
            h, w = self.shape
            excess = np.sum((psd[self._band] - main.floor) * g.counts[self._band])
            band_power = float(excess / (h * w * mean**2))
        psd.setflags(write=False)
        return PsdResult(
            freqs_per_um=g.freqs, psd=psd, floor=main.floor, cutoff_per_um=f_c,
            cutoff_err_per_um=f_err, resolution_nm=res, resolution_err_nm=res_err,
            cutoff_x_per_um=cx.cutoff_per_um, cutoff_y_per_um=cy.cutoff_per_um,
            band_power=band_power, na_fill=na_fill, verdict=main.verdict, n_nonfinite=n_bad,
        )


def radial_psd(image: np.ndarray, pixel_nm: float, *, threshold: float = 2.0,
               band_per_um: tuple[float, float] = (5.0, 15.0), dr_nm: float | None = None,
               wedge_deg: float = 20.0) -> PsdResult:
    """Radial PSD, resolution, x/y cut-offs, band power and NA fill of one image.

    A convenience wrapper around :class:`RadialPsd` (geometry is cached per shape and pixel
    size, so repeated calls stay fast). See the module notes for every convention.

    Parameters
    ----------
    image : array_like, shape (rows, cols)
        Image or ROI, integer or float; non-finite pixels are allowed. Not modified.
    pixel_nm : float
        Pixel size at the sample, nm.
    threshold, band_per_um, dr_nm, wedge_deg
        As for :class:`RadialPsd`.

    Returns
    -------
    PsdResult

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> radial_psd(rng.poisson(1000.0, (128, 128)), pixel_nm=10.0).verdict
    'no_signal'
    """
    arr = _validate_image(image)
    return RadialPsd(arr.shape, pixel_nm, threshold=threshold, band_per_um=band_per_um,
                     dr_nm=dr_nm, wedge_deg=wedge_deg)(arr)
