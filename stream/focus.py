"""Classic image-sharpness (focus) scores.

Each score is a pure function of one image: any integer or float dtype (arithmetic is done in
float64, so unsigned differences cannot wrap), never modified, 2-D ``(rows, cols)`` or a 1-D
line (treated as one row). The classic definitions are sums over the image; here each is the
**mean over its valid terms** instead, so a score does not depend on the ROI size and does not
drop when pixels are masked.

Non-finite pixels (dead pixels after dark/flat correction) are ignored term by term: a term
(a difference, a product, a Sobel neighbourhood) is skipped when any pixel it reads is not
finite, and the mean runs over the remaining terms. A score with no valid term is NaN.

The gradient scores use both axes (the sum of the x and y means), so a sample whose edges all
run along one axis still has a focus curve. The scores scale with intensity (normalized
variance linearly, the others quadratically): compare them within a focus scan, or divide by
``mean_counts`` (or its square) when the beam intensity drifts during the scan.

References
----------
.. [1] F. C. A. Groen, I. T. Young, G. Ligthart, "A comparison of different focus functions for
   use in autofocus algorithms", Cytometry 6, 81 (1985) (normalized variance).
.. [2] J. F. Brenner et al., "An automated microscope for cytologic research", J. Histochem.
   Cytochem. 24, 100 (1976).
.. [3] E. P. Krotkov, "Focusing", Int. J. Comput. Vision 1, 223 (1987); J. M. Tenenbaum,
   "Accommodation in computer vision", PhD thesis, Stanford (1970) (Tenengrad).
.. [4] D. Vollath, "Automatic focusing by correlative methods", J. Microsc. 147, 279 (1987);
   "The influence of the scene parameters and of noise on the behaviour of automatic focusing
   algorithms", J. Microsc. 151, 133 (1988) (F4).
.. [5] Y. Sun, S. Duthaler, B. J. Nelson, "Autofocusing in computer microscopy: selecting the
   optimal focus algorithm", Microsc. Res. Tech. 65, 139 (2004).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from stream.psd import FAST, kernel_array


@njit(nogil=True, cache=True, fastmath=FAST)
def _normalized_variance(image):  # pragma: no cover - compiled
    h, w = image.shape
    n = 0
    s = 0.0
    for y in range(h):
        for x in range(w):
            v = np.float64(image[y, x])
            ok = abs(v) < np.inf
            s += v if ok else 0.0
            n += ok
    if n == 0:
        return np.nan
    mean = s / n
    ss = 0.0
    for y in range(h):
        for x in range(w):
            d = np.float64(image[y, x]) - mean
            ss += d * d if abs(d) < np.inf else 0.0
    if mean == 0.0:
        return np.nan
    return ss / n / mean


@njit(nogil=True, cache=True, fastmath=FAST)
def _brenner(image):  # pragma: no cover - compiled
    """Mean of ``(I[p + 2] − I[p])²`` over valid terms along x, plus the same along y.

    A term is valid when it is finite, which holds exactly when both pixels are; the test
    ``|t| < inf`` keeps the loops branch-free so they vectorise.
    """
    h, w = image.shape
    total = 0.0
    any_axis = False
    n = 0
    s = 0.0
    for y in range(h):
        for x in range(w - 2):
            d = np.float64(image[y, x + 2]) - np.float64(image[y, x])
            t = d * d
            ok = abs(t) < np.inf
            s += t if ok else 0.0
            n += ok
    if n > 0:
        total += s / n
        any_axis = True
    n = 0
    s = 0.0
    for y in range(h - 2):
        for x in range(w):
            d = np.float64(image[y + 2, x]) - np.float64(image[y, x])
            t = d * d
            ok = abs(t) < np.inf
            s += t if ok else 0.0
            n += ok
    if n > 0:
        total += s / n
        any_axis = True
    return total if any_axis else np.nan


@njit(nogil=True, cache=True, fastmath=FAST)
def _vollath_f4(image):  # pragma: no cover - compiled
    """Mean of ``I[p]·(I[p + 1] − I[p + 2])`` over valid terms along x, plus along y.

    Term by term this is ``Σ I[p]I[p+1] − Σ I[p]I[p+2]``, so both classic sums skip the same
    pixels; a term is finite exactly when its three pixels are.
    """
    h, w = image.shape
    total = 0.0
    any_axis = False
    n = 0
    s = 0.0
    for y in range(h):
        for x in range(w - 2):
            t = np.float64(image[y, x]) * (np.float64(image[y, x + 1])
                                           - np.float64(image[y, x + 2]))
            ok = abs(t) < np.inf
            s += t if ok else 0.0
            n += ok
    if n > 0:
        total += s / n
        any_axis = True
    n = 0
    s = 0.0
    for y in range(h - 2):
        for x in range(w):
            t = np.float64(image[y, x]) * (np.float64(image[y + 1, x])
                                           - np.float64(image[y + 2, x]))
            ok = abs(t) < np.inf
            s += t if ok else 0.0
            n += ok
    if n > 0:
        total += s / n
        any_axis = True
    return total if any_axis else np.nan


@njit(nogil=True, cache=True, fastmath=FAST)
def _tenengrad(image):  # pragma: no cover - compiled
    h, w = image.shape
    n = 0
    s = 0.0
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            p00 = np.float64(image[y - 1, x - 1])
            p01 = np.float64(image[y - 1, x])
            p02 = np.float64(image[y - 1, x + 1])
            p10 = np.float64(image[y, x - 1])
            p12 = np.float64(image[y, x + 1])
            p20 = np.float64(image[y + 1, x - 1])
            p21 = np.float64(image[y + 1, x])
            p22 = np.float64(image[y + 1, x + 1])
            gx = (p02 + 2.0 * p12 + p22) - (p00 + 2.0 * p10 + p20)
            gy = (p20 + 2.0 * p21 + p22) - (p00 + 2.0 * p01 + p02)
            g2 = gx * gx + gy * gy
            ok = abs(g2) < np.inf
            s += g2 if ok else 0.0
            n += ok
    if n == 0:
        return np.nan
    return s / n


def _as_image(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"image must be 1-D or 2-D, got shape {arr.shape}")
    if arr.dtype.kind not in "uif":
        raise TypeError(f"image must have an integer or float dtype, got {arr.dtype}")
    if arr.size == 0:
        raise ValueError("image is empty")
    return kernel_array(arr)


def normalized_variance(image: np.ndarray) -> float:
    """Normalized variance ``Σ (I − μ)² / (N μ)`` over the finite pixels (Groen et al. 1985).

    Parameters
    ----------
    image : array_like, shape (rows, cols) or (n,)
        Intensities (counts or corrected transmission).

    Returns
    -------
    float
        Variance divided by the mean, in the image's intensity unit. NaN when no pixel is
        finite or the mean is zero.
    """
    return float(_normalized_variance(_as_image(image)))


def brenner(image: np.ndarray) -> float:
    """Brenner gradient: mean of ``(I[p + 2] − I[p])²`` along x plus the same along y.

    Brenner et al. (1976) use the x direction only; the y term makes the score isotropic.
    An axis shorter than 3 pixels contributes nothing (a 1-D line uses x only).

    Parameters
    ----------
    image : array_like, shape (rows, cols) or (n,)

    Returns
    -------
    float
        Intensity² per term; NaN when no term is valid.
    """
    return float(_brenner(_as_image(image)))


def tenengrad(image: np.ndarray) -> float:
    """Tenengrad: mean of ``Gx² + Gy²`` of the 3×3 Sobel gradients (Krotkov 1987).

    Evaluated on interior pixels only (no padding); a Sobel neighbourhood with any non-finite
    pixel is skipped. No gradient threshold is applied (the classic threshold ``T = 0``).

    Parameters
    ----------
    image : array_like, shape (rows, cols), both at least 3

    Returns
    -------
    float
        Intensity² per pixel; NaN when no neighbourhood is valid.
    """
    arr = _as_image(image)
    if min(arr.shape) < 3:
        raise ValueError(f"tenengrad needs an image of at least 3x3 pixels, got {arr.shape}")
    return float(_tenengrad(arr))


def vollath_f4(image: np.ndarray) -> float:
    """Vollath F4 autocorrelation score, ``⟨I[p]·I[p+1]⟩ − ⟨I[p]·I[p+2]⟩`` along x plus y.

    The two classic sums are evaluated term by term, ``I[p]·(I[p+1] − I[p+2])``, so a pixel
    excluded from one is excluded from the other (Vollath 1987). F4 suppresses the white-noise
    contribution that biases gradient scores, since noise is uncorrelated at lags 1 and 2.

    Parameters
    ----------
    image : array_like, shape (rows, cols) or (n,)

    Returns
    -------
    float
        Intensity² per term; NaN when no term is valid.
    """
    return float(_vollath_f4(_as_image(image)))
