"""Synthetic test images with known truths: Siemens star, Gaussian blur, Poisson noise, shifts.

Plain numpy, float64, no state: the same call gives the same image, so tests (and later the
simulator tests) can derive analytic expectations from the parameters.
"""

from __future__ import annotations

import numpy as np


def siemens_star(shape: tuple[int, int] = (512, 512), pixel_nm: float = 10.0, *,
                 smallest_nm: float = 30.0, n_spokes: int = 72, outer_fraction: float = 0.45,
                 center_px: tuple[float, float] | None = None, t_spoke: float = 0.3,
                 t_open: float = 1.0, supersample: int = 4) -> np.ndarray:
    """Transmission image of a Siemens star, area-averaged over each pixel.

    ``n_spokes`` opaque and ``n_spokes`` open sectors alternate, so the half-period (line width)
    at radius ``r`` is ``π r / n_spokes``. The spokes start at the radius where the line width is
    ``smallest_nm`` (``r_in = n_spokes · smallest_nm / π``) and end at
    ``outer_fraction · min(shape) · pixel_nm``. Inside ``r_in`` the star is a uniform disc of the
    mean transmission (the unresolvable centre); outside it is open (``t_open``).

    Parameters
    ----------
    shape : tuple of int
        ``(rows, cols)``.
    pixel_nm : float
        Pixel size at the sample, nm.
    smallest_nm : float
        Line width (half-period) at the inner end of the spokes, nm.
    n_spokes : int
        Number of opaque spokes.
    outer_fraction : float
        Outer radius as a fraction of the smaller image side.
    center_px : tuple of float or None
        Star centre ``(row, col)`` in pixels (pixel centres are integers); image centre if None.
        Moving it by a sub-pixel amount renders a truly shifted copy (not an interpolation).
    t_spoke, t_open : float
        Transmission of the spokes and of the open areas.
    supersample : int
        Sub-samples per pixel and axis used for the area average (anti-aliasing).

    Returns
    -------
    ndarray of float64, shape ``shape``
        Transmission in ``[t_spoke, t_open]``.
    """
    h, w = shape
    cy, cx = ((h - 1) / 2.0, (w - 1) / 2.0) if center_px is None else center_px
    r_in = n_spokes * smallest_nm / np.pi
    r_out = outer_fraction * min(h, w) * pixel_nm
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    ys = (np.arange(h)[:, None] + sub[None, :]).ravel() - cy
    xs = (np.arange(w)[:, None] + sub[None, :]).ravel() - cx
    out = np.empty(shape)
    # Row blocks keep the supersampled temporaries small.
    rows_per_block = max(1, 65536 // (w * supersample))
    for y0 in range(0, h, rows_per_block):
        y1 = min(h, y0 + rows_per_block)
        yy = ys[y0 * supersample:y1 * supersample, None] * pixel_nm
        xx = xs[None, :] * pixel_nm
        r = np.hypot(yy, xx)
        sector = np.floor(np.arctan2(yy, xx) * n_spokes / np.pi).astype(np.int64)
        t = np.where(sector % 2 == 0, t_spoke, t_open)
        t = np.where(r < r_in, 0.5 * (t_spoke + t_open), t)
        t = np.where(r > r_out, t_open, t)
        out[y0:y1] = t.reshape(y1 - y0, supersample, w, supersample).mean(axis=(1, 3))
    return out


def gaussian_mtf(shape: tuple[int, int], sigma_nm: float | tuple[float, float],
                 pixel_nm: float) -> np.ndarray:
    """Amplitude MTF ``exp(-2 π² (σy² fy² + σx² fx²))`` of a Gaussian PSF on the ``fft2`` grid.

    ``sigma_nm`` is one standard deviation for both axes or ``(sigma_y_nm, sigma_x_nm)``.
    """
    sigma_y, sigma_x = (sigma_nm, sigma_nm) if np.isscalar(sigma_nm) else sigma_nm
    pixel_um = pixel_nm * 1e-3
    fy = np.fft.fftfreq(shape[0], d=pixel_um)[:, None]
    fx = np.fft.fftfreq(shape[1], d=pixel_um)[None, :]
    return np.exp(-2.0 * np.pi**2 * ((sigma_y * 1e-3 * fy) ** 2 + (sigma_x * 1e-3 * fx) ** 2))


def gaussian_blur(image: np.ndarray, sigma_nm: float | tuple[float, float],
                  pixel_nm: float) -> np.ndarray:
    """Blur by a Gaussian PSF of standard deviation ``sigma_nm``, exactly in Fourier space.

    ``sigma_nm`` as for :func:`gaussian_mtf`. The convolution is circular; images with a
    uniform border (like :func:`siemens_star`) are unaffected by the wrap-around.
    """
    spec = np.fft.fft2(image) * gaussian_mtf(image.shape, sigma_nm, pixel_nm)
    return np.fft.ifft2(spec).real


def poisson_image(transmission: np.ndarray, dose: float, seed: int) -> np.ndarray:
    """Poisson counts with mean ``dose · transmission`` (dose in counts per open pixel)."""
    rng = np.random.default_rng(seed)
    return rng.poisson(dose * np.asarray(transmission)).astype(np.float32)


def fourier_shift(image: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """Circularly shift ``image`` by ``(dy, dx)`` pixels: ``out[y, x] = image[y - dy, x - dx]``."""
    fy = np.fft.fftfreq(image.shape[0])[:, None]
    fx = np.fft.fftfreq(image.shape[1])[None, :]
    ramp = np.exp(-2j * np.pi * (fy * dy + fx * dx))
    return np.fft.ifft2(np.fft.fft2(image) * ramp).real
