"""Radial PSD and PSD resolution: kernels against numpy oracles, synthetic truths, real data.

The synthetic truth: a Siemens star (18 spokes, smallest line width 30 nm, 10 nm pixels)
blurred by a Gaussian PSF of known σ and noised by Poisson statistics at a known dose. Its
expected radial PSD is ``dose² · P₀(f) · MTF²(f) + N`` where ``P₀`` is the PSD of the noise-free,
unblurred star (computed here by a plain-numpy oracle), ``MTF²(f) = exp(-4π²σ²f²)`` the Gaussian
MTF squared and ``N`` the white Poisson floor, ``dose · Σw²t / Σw²`` (the variance of each pixel
is its mean, weighted by the window). The star's power falls roughly as ``f⁻³`` (edges), so the
expected PSD falls monotonically through the crossing; ``f_c`` is expected where its smoothed
value falls to ``threshold × N``, i.e. where signal = ``(threshold − 1) × N``. The measured
cut-off must match within 15 %.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from stream.psd import (
    FLOOR_BAND_START,
    MIN_BIN,
    SMOOTH_HALF_BINS,
    RadialPsd,
    WindowedSpectrum,
    _prepare,
    radial_psd,
)
from tests.synthetic import gaussian_blur, poisson_image, siemens_star

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PIXEL_NM = 10.0
SHAPE = (512, 512)


# ---------------------------------------------------------------- plain-numpy oracles

def prepare_oracle(image: np.ndarray) -> tuple[np.ndarray, int, float]:
    """Fill non-finite with the finite mean, subtract the w²-weighted LS plane, window."""
    img = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(img)
    img = np.where(finite, img, img[finite].mean())
    h, w = img.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    yy, xx = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones(h * w), (yy - (h - 1) / 2).ravel(), (xx - (w - 1) / 2).ravel()], 1)
    wt = win.ravel()
    coef, *_ = np.linalg.lstsq(design * wt[:, None], img.ravel() * wt, rcond=None)
    resid = img - (design @ coef).reshape(h, w)
    return resid * win, int((~finite).sum()), float(coef[0])


def radial_oracle(image: np.ndarray, pixel_nm: float, wedge_deg: float = 20.0):
    """fft2 over the full plane and a Python loop over radial bins: overall, x and y wedges."""
    windowed, _, _ = prepare_oracle(image)
    h, w = windowed.shape
    power = np.abs(np.fft.fft2(windowed)) ** 2 / np.sum(np.outer(np.hanning(h), np.hanning(w))
                                                        ** 2)
    pixel_um = pixel_nm * 1e-3
    fy = np.fft.fftfreq(h, d=pixel_um)[:, None] * np.ones((1, w))
    fx = np.fft.fftfreq(w, d=pixel_um)[None, :] * np.ones((h, 1))
    df = max(1 / (h * pixel_um), 1 / (w * pixel_um))
    k = np.rint(np.hypot(fy, fx) / df).astype(int)
    tan_w = np.tan(np.radians(wedge_deg))
    in_x = np.abs(fy) <= tan_w * np.abs(fx)
    in_y = np.abs(fx) <= tan_w * np.abs(fy)
    n = min(h, w) // 2
    out = np.zeros((3, n))
    for i in range(1, n + 1):
        ring = k == i
        out[0, i - 1] = power[ring].mean()
        out[1, i - 1] = power[ring & in_x].mean()
        out[2, i - 1] = power[ring & in_y].mean()
    return out


def smooth_log(p: np.ndarray) -> np.ndarray:
    m = SMOOTH_HALF_BINS
    logp = np.log(p)
    return np.array([logp[max(0, i - m):i + m + 1].mean() for i in range(p.size)])


@lru_cache(maxsize=1)
def star() -> np.ndarray:
    return siemens_star(SHAPE, PIXEL_NM, smallest_nm=30.0, n_spokes=18)


@lru_cache(maxsize=1)
def star_psd_noise_free() -> np.ndarray:
    return radial_oracle(star(), PIXEL_NM)[0]


def expected_cutoff(sigma_nm: float, dose: float, threshold: float = 2.0) -> float:
    freqs = RadialPsd(SHAPE, PIXEL_NM).freqs_per_um
    blurred = gaussian_blur(star(), sigma_nm, PIXEL_NM)
    win2 = np.outer(np.hanning(SHAPE[0]), np.hanning(SHAPE[1])) ** 2
    noise = dose * np.sum(win2 * blurred) / np.sum(win2)
    mtf2 = np.exp(-4 * np.pi**2 * (sigma_nm * 1e-3) ** 2 * freqs**2)
    smooth = smooth_log(dose**2 * star_psd_noise_free() * mtf2 + noise)
    level = np.log(threshold * noise)
    peak = int(np.argmax(smooth[MIN_BIN - 1:])) + MIN_BIN - 1
    i = peak + int(np.argmax(smooth[peak:] <= level))
    return float(freqs[i - 1] + (smooth[i - 1] - level) / (smooth[i - 1] - smooth[i])
                 * (freqs[i] - freqs[i - 1]))


# ---------------------------------------------------------------- kernels vs oracles

@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_prepare_kernel_matches_oracle(dtype):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:48, 0:40]
    img = (1000 + 3 * yy - 2 * xx + rng.normal(0, 20, (48, 40))).astype(dtype)
    if dtype == np.float32:
        img[3, 5] = np.nan
        img[10, 0:4] = np.inf
        img[40, 39] = -np.inf
    ws = WindowedSpectrum(img.shape)
    out = np.empty(img.shape, dtype=np.float32)
    n_bad, mean = _prepare(img, ws.win_y, ws.win_x, out)
    expected, n_expected, mean_expected = prepare_oracle(img)
    assert n_bad == n_expected
    np.testing.assert_allclose(mean, mean_expected, rtol=1e-9)
    np.testing.assert_allclose(out, expected, atol=1e-3 * np.abs(expected).max())


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (81, 63)])
def test_radial_profiles_match_full_plane_oracle(shape):
    rng = np.random.default_rng(2)
    img = rng.poisson(200.0, shape).astype(np.float32)
    img[: shape[0] // 2] += 50.0 * np.sin(np.arange(shape[1]) * 0.9)
    analyser = RadialPsd(shape, 25.0)
    psd, psd_x, psd_y = analyser.profiles(analyser.spectrum(img)[0])
    oracle = radial_oracle(img, 25.0)
    np.testing.assert_allclose(psd, oracle[0], rtol=2e-4)
    np.testing.assert_allclose(psd_x, oracle[1], rtol=2e-4)
    np.testing.assert_allclose(psd_y, oracle[2], rtol=2e-4)


def test_frequency_axis_units():
    analyser = RadialPsd((256, 256), 10.0)
    freqs = analyser.freqs_per_um
    assert freqs[0] == pytest.approx(1 / (256 * 0.01))
    assert freqs[-1] == pytest.approx(50.0)  # Nyquist of 10 nm pixels, µm⁻¹


# ---------------------------------------------------------------- noise: floor and no_signal

def test_white_noise_floor_is_its_variance_and_gives_no_signal():
    rng = np.random.default_rng(3)
    result = radial_psd(rng.normal(100.0, 3.0, (256, 256)), PIXEL_NM)
    assert result.floor == pytest.approx(9.0, rel=0.05)
    assert result.verdict == "no_signal"
    assert result.cutoff_per_um is None and result.resolution_nm is None
    assert result.resolution_err_nm is None and result.na_fill is None


@pytest.mark.parametrize("dose", [10.0, 1000.0, 30000.0])
def test_pure_poisson_noise_gives_no_signal(dose):
    rng = np.random.default_rng(int(dose))
    result = radial_psd(rng.poisson(dose, SHAPE), PIXEL_NM)
    assert result.verdict == "no_signal"
    assert result.resolution_nm is None
    assert result.floor == pytest.approx(dose, rel=0.05)
    # The floor is subtracted: what is left is ~1 % of the raw noise power in the band.
    assert result.band_power == pytest.approx(0.0, abs=0.01 / dose)


def test_tilted_flat_field_gives_no_signal():
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:512, 0:512] / 512.0
    flat = rng.poisson(1000.0 * (1 + 0.3 * xx - 0.1 * yy))
    assert radial_psd(flat, PIXEL_NM).verdict == "no_signal"


# ---------------------------------------------------------------- Siemens star truths

SIGMAS_NM = (10.0, 15.0, 20.0, 30.0, 45.0)


@pytest.mark.parametrize("dose", [300.0, 3000.0])
def test_star_resolution_matches_gaussian_mtf_expectation(dose):
    resolutions = []
    for k, sigma in enumerate(SIGMAS_NM):
        img = poisson_image(gaussian_blur(star(), sigma, PIXEL_NM), dose, seed=10 * k + int(dose))
        result = radial_psd(img, PIXEL_NM)
        expected = expected_cutoff(sigma, dose)
        assert MIN_BIN * 0.2 < expected < FLOOR_BAND_START * 50.0
        assert result.verdict == "resolved", (sigma, dose)
        assert result.cutoff_per_um == pytest.approx(expected, rel=0.15), (sigma, dose)
        assert result.resolution_nm == pytest.approx(1e3 / (2 * result.cutoff_per_um))
        assert 0 < result.resolution_err_nm < 0.15 * result.resolution_nm
        assert result.floor == pytest.approx(dose * 0.65, rel=0.1)
        resolutions.append(result.resolution_nm)
    assert np.all(np.diff(resolutions) > 0), resolutions


def test_resolution_improves_with_dose():
    blurred = gaussian_blur(star(), 20.0, PIXEL_NM)
    res = [radial_psd(poisson_image(blurred, d, seed=5), PIXEL_NM).resolution_nm
           for d in (100.0, 1000.0, 10000.0)]
    assert res[0] > res[1] > res[2]


def test_band_power_is_dose_robust_and_falls_with_blur():
    sharp = gaussian_blur(star(), 15.0, PIXEL_NM)
    blurry = gaussian_blur(star(), 40.0, PIXEL_NM)
    low = radial_psd(poisson_image(sharp, 300.0, seed=6), PIXEL_NM).band_power
    high = radial_psd(poisson_image(sharp, 10000.0, seed=7), PIXEL_NM).band_power
    noise_free = radial_psd(sharp, PIXEL_NM).band_power
    assert low == pytest.approx(noise_free, rel=0.1)
    assert high == pytest.approx(noise_free, rel=0.03)
    assert radial_psd(blurry * 1000.0, PIXEL_NM).band_power < 0.5 * noise_free


def test_anisotropic_blur_separates_x_and_y_cutoffs():
    # PSF wider along x (columns): structure varying along x is lost first.
    img = poisson_image(gaussian_blur(star(), (12.0, 30.0), PIXEL_NM), 3000.0, seed=8)
    result = radial_psd(img, PIXEL_NM)
    assert result.cutoff_x_per_um < 0.8 * result.cutoff_y_per_um
    assert result.cutoff_x_per_um < result.cutoff_per_um < result.cutoff_y_per_um
    swapped = radial_psd(img.T, PIXEL_NM)
    assert swapped.cutoff_x_per_um == pytest.approx(result.cutoff_y_per_um, rel=0.02)


def test_na_fill_from_cutoff_and_zone_width():
    img = poisson_image(gaussian_blur(star(), 15.0, PIXEL_NM), 3000.0, seed=9)
    result = radial_psd(img, PIXEL_NM, dr_nm=25.0)
    # σ = 2·Δr·f_c − 1 with Δr in µm: 25 µm⁻¹ at Δr = 25 nm would be σ = 0.25.
    assert result.na_fill == pytest.approx(2 * 0.025 * result.cutoff_per_um - 1)
    assert radial_psd(img, PIXEL_NM).na_fill is None


def test_signal_up_to_nyquist_is_reported_as_a_bound():
    # 30 nm pixels undersample the sharp star: signal runs into the floor band.
    img = poisson_image(siemens_star((256, 256), 30.0, smallest_nm=30.0, n_spokes=24), 1e5, 11)
    result = radial_psd(img, 30.0)
    assert result.verdict == "nyquist_limited"
    nyquist = 1 / (2 * 0.03)
    assert result.cutoff_per_um >= FLOOR_BAND_START * nyquist - 1e-9
    assert result.resolution_nm <= 30.0 / FLOOR_BAND_START + 1e-9
    assert result.resolution_err_nm is None and result.na_fill is None


def test_non_finite_pixels_are_counted_and_ignored():
    img = poisson_image(gaussian_blur(star(), 20.0, PIXEL_NM), 3000.0, seed=12)
    clean = radial_psd(img, PIXEL_NM)
    dirty = img.copy()
    dirty[100, 100] = np.nan
    dirty[200, 300:305] = np.inf
    dirty[400, 50] = -np.inf
    before = dirty.copy()
    result = radial_psd(dirty, PIXEL_NM)
    np.testing.assert_array_equal(dirty, before)  # input untouched
    assert result.n_nonfinite == 7
    assert result.verdict == "resolved"
    assert result.cutoff_per_um == pytest.approx(clean.cutoff_per_um, rel=0.03)


def test_all_non_finite_gives_no_signal():
    result = radial_psd(np.full((64, 64), np.nan, dtype=np.float32), PIXEL_NM)
    assert result.verdict == "no_signal" and result.n_nonfinite == 64 * 64
    assert result.band_power is None


def test_result_is_immutable():
    result = radial_psd(np.random.default_rng(0).random((64, 64)), PIXEL_NM)
    with pytest.raises(AttributeError):
        result.verdict = "resolved"
    with pytest.raises(ValueError):
        result.psd[0] = 1.0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"pixel_nm": 0.0}, "pixel_nm"),
    ({"pixel_nm": 10.0, "threshold": 1.0}, "threshold"),
    ({"pixel_nm": 10.0, "band_per_um": (5.0, 2.0)}, "band_per_um"),
    ({"pixel_nm": 10.0, "dr_nm": -1.0}, "dr_nm"),
    ({"pixel_nm": 10.0, "wedge_deg": 50.0}, "wedge_deg"),
])
def test_bad_configuration_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RadialPsd((64, 64), **kwargs)


def test_bad_images_are_rejected():
    analyser = RadialPsd((64, 64), PIXEL_NM)
    with pytest.raises(ValueError, match="shape"):
        analyser(np.zeros((64, 65)))
    with pytest.raises(ValueError, match="2-D"):
        radial_psd(np.zeros(64), PIXEL_NM)
    with pytest.raises(TypeError, match="dtype"):
        radial_psd(np.zeros((64, 64), dtype=complex), PIXEL_NM)
    with pytest.raises(ValueError, match=">= 32"):
        radial_psd(np.zeros((16, 64)), PIXEL_NM)


# ---------------------------------------------------------------- real data

def test_neutron_siemens_star_with_non_finite_pixels():
    tifffile = pytest.importorskip("tifffile")
    path = DATA / "neutron-siemens-star" / "siemens_star.tif"
    if not path.exists():
        pytest.skip(f"real data not present: {path}")
    image = tifffile.imread(path)
    n_bad = int((~np.isfinite(image)).sum())
    assert n_bad > 0  # the file's documented NaN/inf pixels
    # Timepix pixel 55 µm; the numbers below are in units of that pixel.
    result = radial_psd(image, 55_000.0)
    assert result.n_nonfinite == n_bad
    assert result.verdict in ("resolved", "nyquist_limited")
    assert np.isfinite(result.resolution_nm)
    assert 55_000.0 <= result.resolution_nm < 10 * 55_000.0
    assert np.isfinite(result.psd).all()


def test_xradia_txm_chip_resolution():
    olefile = pytest.importorskip("olefile")
    path = DATA / "xradia-txm" / "test_chip00.xrm"
    if not path.exists():
        pytest.skip(f"real data not present: {path}")
    with olefile.OleFileIO(str(path)) as ole:
        image = np.frombuffer(ole.openstream("ImageData1/Image1").read(), "<u2")
        pixel_um = np.frombuffer(ole.openstream("ImageInfo/PixelSize").read(), "<f4")[0]
    image = image.reshape(512, 512)
    result = radial_psd(image, float(pixel_um) * 1e3)
    assert result.verdict == "resolved"
    # 4×-binned 78 nm pixels: the resolution lies between 2 pixels and a few hundred nm.
    assert 2 * 77.9 < result.resolution_nm < 1000.0
    assert result.resolution_err_nm < 0.1 * result.resolution_nm
