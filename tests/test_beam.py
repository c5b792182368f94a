"""Beam metrics: binning, centroid, counts, illumination uniformity, flat repeatability."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from stream.beam import (
    _bin_mean,
    _fov_cv,
    _weighted_centroid,
    beam_stats,
    bin_image,
    bin_image_and_totals,
    binned_to_full_px,
    flat_repeatability,
    gaussian_kernel,
    illumination_uniformity,
    smooth_nan,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ---------------------------------------------------------------- plain-numpy oracles

def bin_oracle(img, factor):
    img = np.asarray(img, dtype=np.float64)
    h, w = img.shape[0] // factor, img.shape[1] // factor
    blocks = img[: h * factor, : w * factor].reshape(h, factor, w, factor)
    blocks = np.where(np.isfinite(blocks), blocks, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks: "mean of empty slice"
        means = np.nanmean(blocks, axis=(1, 3))
    finite = np.isfinite(img)
    return means, img[finite].sum(), int(finite.sum())


def smooth_oracle(img, sigma):
    valid = np.isfinite(img)
    num = ndimage.gaussian_filter(np.where(valid, img, 0.0).astype(float), sigma, mode="constant")
    den = ndimage.gaussian_filter(valid.astype(float), sigma, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-6, num / den, np.nan)


def gaussian_spot(shape, cy, cx, sigma, amplitude=1000.0, background=0.0):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return background + amplitude * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


# ---------------------------------------------------------------- binning

@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.float64])
@pytest.mark.parametrize(("shape", "factor"), [((64, 48), 4), ((67, 53), 8), ((30, 30), 1)])
def test_bin_kernel_matches_oracle(dtype, shape, factor):
    rng = np.random.default_rng(40)
    img = rng.poisson(300.0, shape).astype(dtype)
    if dtype != np.uint16:
        img[3, 5] = np.nan
        img[10, :] = np.inf
        img[16:24, 8:16] = np.nan  # a whole block when factor is 4 or 8
    out = np.empty((shape[0] // factor, shape[1] // factor), dtype=np.float32)
    total, n = _bin_mean(img, factor, out)
    means, total_ref, n_ref = bin_oracle(img, factor)
    np.testing.assert_allclose(out, means, rtol=1e-6, equal_nan=True)
    assert n == n_ref
    assert total == pytest.approx(total_ref, rel=1e-9)


def test_bin_image_reuses_out_and_leaves_input():
    img = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    before = img.copy()
    out = np.empty((16, 16), dtype=np.float32)
    assert bin_image(img, 4, out=out) is out
    np.testing.assert_array_equal(img, before)
    binned, total, n = bin_image_and_totals(img, 4)
    assert total == pytest.approx(img.sum()) and n == img.size
    np.testing.assert_allclose(binned, out)


def test_bin_image_rejects_bad_arguments():
    img = np.zeros((32, 32))
    for factor in (0, -2, 2.5, True, 33):
        with pytest.raises(ValueError, match="factor"):
            bin_image(img, factor)
    with pytest.raises(ValueError, match="out"):
        bin_image(img, 4, out=np.empty((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        bin_image(np.zeros(32), 2)


# ---------------------------------------------------------------- centroid and counts

@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.float64])
def test_centroid_kernel_matches_oracle(dtype):
    rng = np.random.default_rng(46)
    img = rng.poisson(50.0, (40, 70)).astype(dtype)
    if dtype != np.uint16:
        img[3, 4] = np.nan
        img[20, 30:33] = np.inf
    background = 48.0
    v = img.astype(np.float64)
    finite = np.isfinite(v)
    wt = np.where(finite, np.clip(v - background, 0, None), 0.0)
    yy, xx = np.mgrid[0:40, 0:70]
    sy, sx, sw, sv, n = _weighted_centroid(img, background)
    assert sw == pytest.approx(wt.sum(), rel=1e-12)
    assert sy == pytest.approx((wt * yy).sum(), rel=1e-12)
    assert sx == pytest.approx((wt * xx).sum(), rel=1e-12)
    assert sv == pytest.approx(v[finite].sum(), rel=1e-12)
    assert n == finite.sum()


def test_centroid_of_gaussian_spot_in_px_and_um():
    img = gaussian_spot((200, 300), cy=80.3, cx=190.7, sigma=6.0)
    stats = beam_stats(img, pixel_nm=20.0)
    assert stats.centroid_y_px == pytest.approx(80.3, abs=1e-6)
    assert stats.centroid_x_px == pytest.approx(190.7, abs=1e-6)
    # µm at the sample from the frame centre ((rows-1)/2, (cols-1)/2).
    assert stats.centroid_y_um == pytest.approx((80.3 - 99.5) * 0.02, abs=1e-8)
    assert stats.centroid_x_um == pytest.approx((190.7 - 149.5) * 0.02, abs=1e-8)
    assert stats.total_counts == pytest.approx(img.sum())
    assert stats.mean_counts == pytest.approx(img.mean())
    assert beam_stats(img).centroid_y_um is None


def test_background_keeps_uniform_level_from_pulling_centroid_to_centre():
    img = gaussian_spot((200, 200), cy=50.0, cx=150.0, sigma=5.0, background=100.0)
    plain = beam_stats(img)
    assert abs(plain.centroid_x_px - 150.0) > 20  # pulled towards the centre
    clipped = beam_stats(img, background=120.0)
    assert clipped.centroid_y_px == pytest.approx(50.0, abs=0.05)
    assert clipped.centroid_x_px == pytest.approx(150.0, abs=0.05)


def test_centroid_ignores_non_finite_pixels():
    img = gaussian_spot((100, 100), cy=40.0, cx=60.0, sigma=4.0)
    img[0, 0] = np.nan
    img[99, 99] = np.inf
    stats = beam_stats(img)
    assert stats.n_finite == 100 * 100 - 2
    assert stats.centroid_y_px == pytest.approx(40.0, abs=1e-6)
    assert np.isfinite(stats.total_counts)
    assert np.isnan(beam_stats(np.full((4, 4), np.nan)).centroid_x_px)


def test_centroid_on_binned_frame_maps_back_to_full_frame():
    img = gaussian_spot((512, 512), cy=200.4, cx=300.9, sigma=12.0)
    for factor in (2, 4, 8):
        stats = beam_stats(bin_image(img, factor))
        assert binned_to_full_px(stats.centroid_y_px, factor) == pytest.approx(200.4, abs=0.01)
        assert binned_to_full_px(stats.centroid_x_px, factor) == pytest.approx(300.9, abs=0.01)


# ---------------------------------------------------------------- smoothing and uniformity

@pytest.mark.parametrize("sigma", [0.7, 2.0, 5.0])
def test_smooth_kernel_matches_scipy_normalised_convolution(sigma):
    rng = np.random.default_rng(41)
    img = rng.random((70, 45)).astype(np.float32)
    img[5, 7] = np.nan
    img[30:34, 20] = np.inf
    np.testing.assert_allclose(smooth_nan(img, sigma), smooth_oracle(img, sigma), rtol=2e-5,
                               equal_nan=True)
    assert gaussian_kernel(sigma).sum() == pytest.approx(1.0)


def test_fov_cv_kernel_matches_oracle():
    rng = np.random.default_rng(45)
    field = 1e4 + 300.0 * rng.normal(size=(64, 80))
    field[:10] = 100.0  # dark rows outside the field of view
    field[20, 20] = np.nan
    field[30, 31] = np.inf
    inside = field[np.isfinite(field) & (field >= 0.5 * np.nanmax(field[np.isfinite(field)]))]
    assert _fov_cv(field, 0.5) == pytest.approx(inside.std() / inside.mean(), rel=1e-9)
    assert np.isnan(_fov_cv(np.full((4, 4), np.nan), 0.5))
    assert np.isnan(_fov_cv(np.zeros((4, 4)), 0.5))


def test_uniform_field_has_small_cv_and_modulation_is_measured():
    rng = np.random.default_rng(42)
    yy, xx = np.mgrid[0:256, 0:256]
    flat = rng.poisson(1e4, (256, 256)).astype(np.float32)
    assert illumination_uniformity(flat, sigma_px=2.0) < 0.005
    # A 5 % cosine modulation of period 64 px survives σ = 2 px smoothing almost intact:
    # CV = a/√2 · exp(-2π²σ²/L²).
    wave = 1e4 * (1 + 0.05 * np.cos(2 * np.pi * xx / 64.0))
    expected = 0.05 / np.sqrt(2) * np.exp(-2 * np.pi**2 * 4 / 64.0**2)
    assert illumination_uniformity(wave, sigma_px=2.0) == pytest.approx(expected, rel=0.03)


def test_field_of_view_excludes_dark_surroundings():
    yy, xx = np.mgrid[0:256, 0:256]
    disc = np.where(np.hypot(yy - 128, xx - 128) < 100, 1000.0, 5.0)
    cv = illumination_uniformity(disc, sigma_px=2.0)
    assert cv < 0.1  # only the illuminated disc (and its soft edge) counts
    with pytest.raises(ValueError, match="fov_fraction"):
        illumination_uniformity(disc, fov_fraction=1.0)


# ---------------------------------------------------------------- flat repeatability

def test_flat_repeatability_ignores_global_scale_and_sees_pattern_change():
    rng = np.random.default_rng(43)
    yy, xx = np.mgrid[0:128, 0:128]
    flat = 1000.0 * (1 + 0.2 * np.sin(xx / 9.0) * np.cos(yy / 13.0))
    assert flat_repeatability(flat, flat) == 0.0
    assert flat_repeatability(flat, 1.7 * flat) == pytest.approx(0.0, abs=1e-12)
    pattern = rng.normal(0, 1, (128, 128))
    changed = flat * (1 + 0.02 * pattern / pattern.std())
    assert flat_repeatability(flat, changed) == pytest.approx(0.02, rel=0.05)


def test_flat_repeatability_of_poisson_flats_is_shot_noise():
    rng = np.random.default_rng(44)
    a = rng.poisson(2500.0, (256, 256)).astype(np.float32)
    b = rng.poisson(2500.0, (256, 256)).astype(np.float32)
    assert flat_repeatability(a, b) == pytest.approx(np.sqrt(2 / 2500), rel=0.03)
    assert flat_repeatability(a, b, sigma_px=3.0) < 0.2 * np.sqrt(2 / 2500)
    with pytest.raises(ValueError, match="shape"):
        flat_repeatability(a, b[:-1])


# ---------------------------------------------------------------- real data

def test_xradia_condenser_spot_centroid_and_uniformity():
    """The Xradia chip image has a bright condenser spot near row 228, column 290 and many
    single-pixel zingers; binning by 8 dilutes the zingers, and a background of 0.7 × the
    binned maximum keeps only the spot."""
    olefile = pytest.importorskip("olefile")
    path = DATA / "xradia-txm" / "test_chip00.xrm"
    if not path.exists():
        pytest.skip(f"real data not present: {path}")
    with olefile.OleFileIO(str(path)) as ole:
        image = np.frombuffer(ole.openstream("ImageData1/Image1").read(), "<u2")
    image = image.reshape(512, 512)
    peak_y, peak_x = np.unravel_index(np.argmax(smooth_nan(image, 4.0)), image.shape)
    binned = bin_image(image, 8)
    stats = beam_stats(binned, pixel_nm=77.9 * 8, background=0.7 * np.nanmax(binned))
    cy = binned_to_full_px(stats.centroid_y_px, 8)
    cx = binned_to_full_px(stats.centroid_x_px, 8)
    assert np.hypot(cy - peak_y, cx - peak_x) < 5.0
    assert stats.centroid_y_um == pytest.approx((cy - 255.5) * 0.0779, rel=1e-6)
    totals = beam_stats(image)
    assert totals.total_counts == float(image.astype(np.int64).sum())
    assert 0.05 < illumination_uniformity(binned, 2.0) < 0.5
