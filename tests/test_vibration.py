"""Phase-correlation shifts, jitter tracking and registered averaging."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from stream.focus import brenner
from stream.vibration import (
    FIT_RADIUS,
    JitterTracker,
    PhaseCorrelator,
    RegisteredAverager,
    _cross_power,
    _phase_plane,
    _shifted_mask,
    fourier_shift_image,
    min_significant_peak,
    phase_correlation_shift,
    register_average,
)
from tests.synthetic import fourier_shift, gaussian_blur, poisson_image, siemens_star

SHAPE = (256, 256)


@lru_cache(maxsize=1)
def star() -> np.ndarray:
    return siemens_star(SHAPE, 10.0, n_spokes=18)


def shifted_star(dy: float, dx: float) -> np.ndarray:
    """The star rendered at a shifted centre: a true, non-circular, sub-pixel shifted copy."""
    centre = ((SHAPE[0] - 1) / 2 + dy, (SHAPE[1] - 1) / 2 + dx)
    return siemens_star(SHAPE, 10.0, n_spokes=18, center_px=centre)


# ---------------------------------------------------------------- kernels vs oracles

def test_cross_power_kernel_matches_oracle():
    rng = np.random.default_rng(50)
    a = (rng.normal(size=(32, 17)) + 1j * rng.normal(size=(32, 17))).astype(np.complex64)
    b = (rng.normal(size=(32, 17)) + 1j * rng.normal(size=(32, 17))).astype(np.complex64)
    b[3, 4] = 0.0
    cross = np.empty_like(a)
    normalized = np.empty_like(a)
    _cross_power(a, b, cross, normalized)
    expected = a * np.conj(b)
    np.testing.assert_allclose(cross, expected, rtol=1e-5, atol=1e-6)
    mag = np.abs(expected)
    np.testing.assert_allclose(normalized, np.where(mag > 0, expected / np.where(mag > 0, mag, 1),
                                                    0), rtol=1e-5, atol=1e-6)


def test_phase_plane_kernel_matches_weighted_least_squares_oracle():
    rng = np.random.default_rng(51)
    h, w = 40, 36
    spec = (rng.normal(size=(h, w // 2 + 1)) + 1j * rng.normal(size=(h, w // 2 + 1)))
    py, px = 2.0, -3.0
    dy, dx = _phase_plane(spec, w, py, px)
    ky = np.fft.fftfreq(h)[:, None] * np.ones((1, w // 2 + 1))
    kx = np.fft.rfftfreq(w)[None, :] * np.ones((h, 1))
    c = spec * np.exp(2j * np.pi * (ky * py + kx * px))
    use = (ky**2 + kx**2 <= FIT_RADIUS**2) & ~((ky == 0) & (kx == 0))
    weight = np.abs(c) * np.where((kx == 0) | (kx == 0.5), 1.0, 2.0)
    design = np.stack([2 * np.pi * ky[use], 2 * np.pi * kx[use]], axis=1)
    target = -np.angle(c[use])
    sw = np.sqrt(weight[use])
    coef, *_ = np.linalg.lstsq(design * sw[:, None], target * sw, rcond=None)
    assert (dy, dx) == pytest.approx(tuple(coef), rel=1e-9, abs=1e-12)


def test_shifted_mask_marks_wrapped_border_and_spread_bad_pixels():
    mask = np.ones((10, 12), dtype=bool)
    mask[5, 6] = False
    out = _shifted_mask(mask, 1.4, -2.0)
    assert not out[:2].any()  # rows that came from outside (ceil(1.4) = 2)
    assert not out[:, -2:].any()
    assert not out[6, 4] and not out[7, 4]  # the bad pixel moved by floor and ceil of 1.4
    assert out[3:, :-2].sum() == 7 * 10 - 2


# ---------------------------------------------------------------- phase correlation

@pytest.mark.parametrize(("dy", "dx"), [(0.3, -0.7), (2.25, 1.5), (-4.6, 3.1), (0.0, 0.49)])
def test_fourier_shifted_copy_to_five_hundredths_of_a_pixel(dy, dx):
    ref = poisson_image(gaussian_blur(star(), 15.0, 10.0), 1000.0, seed=52)
    img = fourier_shift(ref, dy, dx)
    est_y, est_x, peak = phase_correlation_shift(ref, img)
    assert est_y == pytest.approx(dy, abs=0.05)
    assert est_x == pytest.approx(dx, abs=0.05)
    assert peak > 0.5


def test_rendered_shifted_copy_with_independent_noise():
    rng = np.random.default_rng(53)
    ref = poisson_image(star(), 1000.0, seed=54)
    for k in range(5):
        dy, dx = rng.uniform(-6, 6, 2)
        img = poisson_image(shifted_star(dy, dx), 1000.0, seed=55 + k)
        est_y, est_x, peak = phase_correlation_shift(ref, img)
        assert est_y == pytest.approx(dy, abs=0.05)
        assert est_x == pytest.approx(dx, abs=0.05)
        assert peak > min_significant_peak(SHAPE)


def test_integer_and_large_shifts_and_sign_convention():
    rng = np.random.default_rng(56)
    ref = rng.random((128, 96))
    img = np.roll(ref, (17, -30), axis=(0, 1))  # content moves down 17 rows, left 30 columns
    dy, dx, peak = phase_correlation_shift(ref, img)
    assert (dy, dx) == pytest.approx((17.0, -30.0), abs=0.02)
    assert img[40, 10] == ref[40 - 17, (10 + 30) % 96]
    back = phase_correlation_shift(img, ref)
    assert back[:2] == pytest.approx((-17.0, 30.0), abs=0.02)


def test_unrelated_images_give_an_insignificant_peak():
    rng = np.random.default_rng(57)
    peak = phase_correlation_shift(rng.random(SHAPE), rng.random(SHAPE))[2]
    assert peak < min_significant_peak(SHAPE)


def test_non_finite_pixels_and_untouched_inputs():
    ref = poisson_image(star(), 1000.0, seed=58)
    img = fourier_shift(ref, 1.3, -0.4).astype(np.float32)
    img[10, 10] = np.nan
    img[100, 50:53] = np.inf
    before = img.copy()
    dy, dx, _ = phase_correlation_shift(ref, img)
    assert (dy, dx) == pytest.approx((1.3, -0.4), abs=0.05)
    np.testing.assert_array_equal(img, before)


def test_flat_images_have_no_shift():
    corr = PhaseCorrelator((32, 32))
    dy, dx, peak = corr.shift_spectra(np.zeros((32, 17), np.complex64),
                                      np.zeros((32, 17), np.complex64))
    assert np.isnan(dy) and np.isnan(dx) and peak == 0.0


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        phase_correlation_shift(np.zeros((32, 32)), np.zeros((32, 31)))
    with pytest.raises(ValueError, match="2-D"):
        phase_correlation_shift(np.zeros(32), np.zeros(32))
    with pytest.raises(ValueError, match=">= 8"):
        phase_correlation_shift(np.zeros((4, 32)), np.zeros((4, 32)))


# ---------------------------------------------------------------- jitter

def test_jitter_rms_of_known_vibration_with_drift_removed():
    rng = np.random.default_rng(59)
    n = 200
    t = np.arange(n + 1)
    # 3 nm RMS per axis of white position jitter on top of a steady 0.5 nm/frame drift.
    pos_y = 0.5 * t + rng.normal(0, 3.0, n + 1)
    pos_x = -0.2 * t + rng.normal(0, 3.0, n + 1)
    tracker = JitterTracker(window=n)
    pixel_nm = 10.0
    for k in range(n):
        value = tracker.update((pos_y[k + 1] - pos_y[k]) / pixel_nm,
                               (pos_x[k + 1] - pos_x[k]) / pixel_nm, pixel_nm)
    assert value == pytest.approx(np.sqrt(2) * 3.0, rel=0.1)

    def detrended_rms(pos):
        return np.sqrt(np.mean((pos - np.polyval(np.polyfit(t, pos, 1), t)) ** 2))

    ry, rx = tracker.rms_yx_nm
    assert ry == pytest.approx(detrended_rms(pos_y), rel=1e-9)
    assert rx == pytest.approx(detrended_rms(pos_x), rel=1e-9)
    assert value == pytest.approx(np.hypot(ry, rx), rel=1e-12)


def test_pure_drift_is_not_vibration_and_window_slides():
    tracker = JitterTracker(window=5)
    assert tracker.update(0.1, 0.0, 10.0) is None
    assert tracker.update(0.1, 0.0, 10.0) is None
    assert tracker.update(0.1, 0.0, 10.0) == pytest.approx(0.0, abs=1e-9)
    for _ in range(10):
        tracker.update(0.1, -0.2, 10.0)
    assert tracker.n_shifts == 5
    assert tracker.rms_nm == pytest.approx(0.0, abs=1e-9)
    tracker.update(3.0, 0.0, 10.0)  # a jump inside the window is seen
    assert tracker.rms_nm > 5.0
    tracker.reset()
    assert tracker.n_shifts == 0 and tracker.rms_nm is None


def test_jitter_tracker_rejects_bad_input():
    with pytest.raises(ValueError, match="window"):
        JitterTracker(window=2)
    tracker = JitterTracker(window=5)
    with pytest.raises(ValueError, match="finite"):
        tracker.update(float("nan"), 0.0, 10.0)
    with pytest.raises(ValueError, match="pixel_nm"):
        tracker.update(0.0, 0.0, 0.0)


# ---------------------------------------------------------------- registered averaging

def test_fourier_shift_image_matches_oracle():
    img = gaussian_blur(star(), 20.0, 10.0)
    np.testing.assert_allclose(fourier_shift_image(img, 1.7, -2.2),
                               fourier_shift(img, 1.7, -2.2), atol=1e-5)


def test_registered_mean_of_shifted_copies_restores_the_original():
    base = gaussian_blur(star(), 20.0, 10.0) * 1000.0
    shifts = [(0.0, 0.0), (1.3, -0.6), (-2.2, 0.8), (0.4, 2.9)]
    frames = [fourier_shift(base, dy, dx) for dy, dx in shifts]
    averager = RegisteredAverager(SHAPE, estimate_px=128)
    for frame in frames:
        averager.add(frame)
    found = np.array(averager.shifts)[:, :2]
    np.testing.assert_allclose(found, np.array(shifts), atol=0.05)
    mean = averager.mean()
    inner = (slice(8, -8), slice(8, -8))
    np.testing.assert_allclose(mean[inner], base[inner], atol=2e-3 * base.max())
    assert np.isnan(mean[0, 0]) or np.isfinite(mean[0, 0])
    assert np.isfinite(mean[inner]).all()


def test_registration_removes_vibration_blur_instead_of_smearing_it():
    rng = np.random.default_rng(60)
    base = gaussian_blur(star(), 10.0, 10.0)
    frames = []
    for k in range(8):
        dy, dx = rng.uniform(-3, 3, 2)
        frames.append(poisson_image(shifted_star(dy, dx), 2000.0, seed=61 + k))
    registered = register_average(frames)
    plain = np.mean(frames, axis=0)
    inner = (slice(10, -10), slice(10, -10))
    single = brenner(frames[0][inner])
    # Noise bias makes one frame's Brenner higher than an average's, so compare with a
    # noise-free reference: registration keeps ~all the sharpness, plain averaging loses it.
    sharp = brenner(base[inner] * 2000.0)
    assert brenner(registered[inner]) > 0.9 * sharp
    assert brenner(plain[inner]) < 0.6 * sharp
    assert single > sharp


def test_non_finite_pixels_are_left_out_of_the_registered_mean():
    base = gaussian_blur(star(), 20.0, 10.0) * 1000.0
    first = base.copy()
    first[50, 60] = np.nan
    second = fourier_shift(base, 1.0, 0.0)
    mean = register_average([first, second], estimate_px=None)
    assert np.isfinite(mean[50, 60])  # filled by the second frame alone
    assert mean[50, 60] == pytest.approx(base[50, 60], rel=1e-3)
    with pytest.raises(ValueError, match="at least one"):
        register_average([])
    with pytest.raises(ValueError, match="shape"):
        RegisteredAverager(SHAPE).add(np.zeros((10, 10)))
