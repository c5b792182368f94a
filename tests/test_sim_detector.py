"""The simulated TXM frame renderer (hw.sim.detector): kernels against numpy oracles, and the
physics the feedback loops are tuned on."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from hw.sim import BeamlineState, SimParams, Simulator, frame_kind, optics
from hw.sim import detector as det

QUIET = dict(vibration_rms_nm=0.0, drift_px_per_s=0.0, jump_px=0.0)


def make_sim(size_px: int = 128, **kw) -> Simulator:
    return Simulator(SimParams(size_px=size_px, **{**QUIET, **kw}))


def radial_power(image: np.ndarray, pixel_nm: float) -> tuple[np.ndarray, np.ndarray]:
    """Azimuthally averaged power spectrum (Hann window) and its frequencies, µm⁻¹."""
    a = image.astype(np.float64)
    a -= a.mean()
    n = a.shape[0]
    w = np.hanning(n)
    p = np.abs(np.fft.fft2(a * np.outer(w, w))) ** 2
    f = np.fft.fftfreq(n, pixel_nm * 1e-3)
    r = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    idx = np.rint(r / f[1]).astype(int).ravel()
    power = np.bincount(idx, p.ravel()) / np.maximum(np.bincount(idx), 1)
    return np.arange(power.size) * f[1], power


def cutoff(freq: np.ndarray, power: np.ndarray) -> float:
    """Highest frequency where the smoothed spectrum is 3x above the noise floor."""
    nyquist = freq[freq.size // 2 if freq.size % 2 else freq.size // 2 - 1]
    floor = np.median(power[(freq > 0.9 * nyquist) & (freq <= nyquist)])
    smooth = np.convolve(np.log(power), np.ones(5) / 5, "same")
    above = np.nonzero((smooth > math.log(3 * floor)) & (freq > 2) & (freq < nyquist))[0]
    return float(freq[above.max()])


def shift_between(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(dy, dx) that moves ``a`` onto ``b`` (integer cross-correlation peak + parabola)."""
    fa = np.fft.fft2(a - a.mean())
    fb = np.fft.fft2(b - b.mean())
    cc = np.fft.ifft2(fb * np.conj(fa)).real
    n = cc.shape[0]
    iy, ix = np.unravel_index(np.argmax(cc), cc.shape)

    def refine(m1: float, c0: float, p1: float) -> float:
        return 0.5 * (m1 - p1) / (m1 - 2 * c0 + p1)
    dy = iy + refine(cc[iy - 1, ix], cc[iy, ix], cc[(iy + 1) % n, ix])
    dx = ix + refine(cc[iy, ix - 1], cc[iy, ix], cc[iy, (ix + 1) % n])
    return ((dy + n / 2) % n - n / 2, (dx + n / 2) % n - n / 2)


# ------------------------------------------------------------------ kernels vs numpy oracles


def splitmix_words(seed: int, count: int) -> np.ndarray:
    state = np.uint64(seed) + det._GOLDEN * np.arange(1, count + 1, dtype=np.uint64)
    z = (state ^ (state >> np.uint64(30))) * det._MIX1
    z = (z ^ (z >> np.uint64(27))) * det._MIX2
    return z ^ (z >> np.uint64(31))


def oracle_normals(seed: int, rows: int, cols: int) -> np.ndarray:
    per_row = (cols + 3) // 4
    words = splitmix_words(seed, rows * per_row).reshape(rows, per_row)
    idx = np.stack([(words >> np.uint64(16 * k)) & np.uint64(0xFFFF) for k in range(4)],
                   axis=-1).reshape(rows, per_row * 4)[:, :cols]
    return det.NORMAL_TABLE[idx.astype(np.int64)]


def bilinear(grid: np.ndarray, y: np.ndarray, x: np.ndarray, outside: float) -> np.ndarray:
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    wy, wx = y - y0, x - x0

    def at(r, c):
        ok = (r >= 0) & (r < grid.shape[0]) & (c >= 0) & (c < grid.shape[1])
        return np.where(ok, grid[np.clip(r, 0, grid.shape[0] - 1),
                                 np.clip(c, 0, grid.shape[1] - 1)], outside)
    return ((1 - wy) * ((1 - wx) * at(y0, x0) + wx * at(y0, x0 + 1))
            + wy * ((1 - wx) * at(y0 + 1, x0) + wx * at(y0 + 1, x0 + 1)))


def test_compose_matches_numpy_oracle() -> None:
    rng = np.random.default_rng(1)
    rows, cols = 30, 37
    canvas = rng.uniform(0.3, 1.0, (40, 50)).astype(np.float32)
    illum = rng.uniform(0.2, 1.0, (9, 9)).astype(np.float32)
    shift, spot, cell = (3.3, -7.6), (1.2, -0.7), 2.5
    photons, dark, read, seed = 4000.0, 100.0, 1.6, 12345
    out = det.compose_frame(np.empty((rows, cols), np.uint16), canvas, shift, illum, cell,
                            spot, photons, dark, read, seed, outside=0.9)

    i, j = np.mgrid[0:rows, 0:cols].astype(np.float64)
    gy = (i - (rows - 1) / 2 - spot[0]) / cell + 4
    gx = (j - (cols - 1) / 2 - spot[1]) / cell + 4
    inside = (np.floor(gy) >= 0) & (np.floor(gy) <= 7) & (np.floor(gx) >= 0) & \
        (np.floor(gx) <= 7)
    ill = np.where(inside, bilinear(illum.astype(np.float64), gy, gx, 0.0), 0.0)
    cy = i - (rows - 1) / 2 - shift[0] + (canvas.shape[0] - 1) / 2
    cx = j - (cols - 1) / 2 - shift[1] + (canvas.shape[1] - 1) / 2
    mean = photons * ill * bilinear(canvas.astype(np.float64), cy, cx, 0.9)
    assert np.all((mean == 0) | (mean >= det.GAUSSIAN_MIN_COUNTS))  # the Gaussian branch only
    z = oracle_normals(seed, rows, cols)
    expect = np.clip(np.floor(mean + np.sqrt(mean + read ** 2) * z + dark + 0.5), 0, 65535)
    diff = np.abs(out.astype(np.int64) - expect.astype(np.int64))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 2  # float rounding at .5 only
    assert np.count_nonzero(mean == 0) > 0 and np.count_nonzero(mean > 0) > 0


def test_compose_without_sample_and_with_beam_off() -> None:
    illum = np.ones((5, 5), np.float32)
    out = det.compose_frame(np.empty((16, 16), np.uint16), None, (0.0, 0.0), illum, 8.0,
                            (0.0, 0.0), 0.0, 100.0, 2.0, 7)
    expect = np.clip(np.floor(2.0 * oracle_normals(7, 16, 16) + 100.5), 0, 65535)
    np.testing.assert_array_equal(out, expect)


def test_compose_low_counts_are_poisson() -> None:
    illum = np.ones((5, 5), np.float32)
    out = det.compose_frame(np.empty((256, 256), np.uint16), None, (0.0, 0.0), illum, 200.0,
                            (0.0, 0.0), 4.0, 100.0, 0.5, 3)
    counts = out.astype(np.float64) - 100.0
    assert counts.mean() == pytest.approx(4.0, abs=0.05)
    assert counts.var() == pytest.approx(4.0 + 0.25 + 1 / 12, rel=0.05)
    # Poisson, not Gaussian: P(0) = e^-4
    assert np.mean(out <= 100) == pytest.approx(math.exp(-4.0) + 0.0, abs=0.01)


def test_compose_rejects_bad_input() -> None:
    illum = np.ones((5, 5), np.float32)
    with pytest.raises(ValueError, match="uint16"):
        det.compose_frame(np.empty((4, 4), np.float32), None, (0, 0), illum, 1.0, (0, 0),
                          1.0, 0.0, 0.0, 1)
    with pytest.raises(ValueError, match="odd"):
        det.compose_frame(np.empty((4, 4), np.uint16), None, (0, 0),
                          np.ones((4, 4), np.float32), 1.0, (0, 0), 1.0, 0.0, 0.0, 1)
    with pytest.raises(ValueError, match="non-finite"):
        det.compose_frame(np.empty((4, 4), np.uint16), None, (math.nan, 0), illum, 1.0,
                          (0, 0), 1.0, 0.0, 0.0, 1)


@pytest.mark.parametrize("with_phase", [False, True])
def test_filtered_spectrum_matches_numpy_oracle(with_phase: bool) -> None:
    rng = np.random.default_rng(2)
    shape, pixel = (64, 48), 9.0
    t = rng.uniform(0.5, 1.0, shape)
    phi = rng.normal(0.0, 0.2, shape)
    ft_t = np.fft.rfft2(t).astype(np.complex64)
    ft_phi = np.fft.rfft2(phi).astype(np.complex64) if with_phase else None
    args = (shape, pixel, 8000.0, 25.0, 0.7, 6.0, (0.25, -0.5))
    got = det.filtered_spectrum(ft_t, ft_phi, *args)

    fy, fx = det.frequency_axes(shape, pixel)
    rho = np.hypot(*np.meshgrid(fy, fx, indexing="ij"))
    h_abs, h_phase = optics.transfer_functions(rho, 8000.0, 25.0, 0.7, 6.0)
    expect = ft_t * h_abs + (ft_phi * h_phase if with_phase else 0)
    ramp = np.exp(-2j * np.pi * (np.fft.fftfreq(shape[0])[:, None] * 0.25
                                 - np.fft.rfftfreq(shape[1])[None, :] * 0.5))
    expect = expect * ramp
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-4 * np.abs(expect).max())


def test_shaker_points() -> None:
    dy, dx, w, whole = det.shaker_points(10.0, 40.0, 0.05, 1.0)  # 2 whole periods
    assert whole == 1.0 and dy.size == 0
    dy, dx, w, whole = det.shaker_points(10.0, 30.0, 0.05, 1.0)  # 1.5 periods
    assert whole == pytest.approx(2 / 3) and w.sum() == pytest.approx(1 / 3)
    np.testing.assert_allclose(np.hypot(dy, dx), 10.0)
    dy, dx, w, whole = det.shaker_points(10.0, 0.0, 0.05, math.pi / 2)  # stopped: parked
    assert whole == 0.0 and w.tolist() == [1.0]
    assert dy[0] == pytest.approx(10.0) and dx[0] == pytest.approx(0.0, abs=1e-12)


def test_average_spot_conserves_light() -> None:
    grid = 33
    spot = np.zeros((grid, grid))
    spot[14:19, 14:19] = 1.0
    pad = 2 * (grid - 1)
    wrapped = np.zeros((pad, pad))
    idx = (np.arange(grid) - (grid - 1) // 2) % pad
    wrapped[np.ix_(idx, idx)] = spot
    theta = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    avg = det.average_spot(np.fft.rfft2(wrapped), grid, 6 * np.sin(theta), 6 * np.cos(theta),
                           np.full(16, 1 / 16), 1.0)
    assert avg.sum() == pytest.approx(spot.sum(), rel=1e-5)
    assert avg.max() < spot.max()
    assert avg[16, 16] < avg[16, 22]  # a ring: the centre is dimmer than the circle


# ------------------------------------------------------------------ API and validation


def test_frame_kind_follows_areadetector_frame_type() -> None:
    assert frame_kind(BeamlineState()) == "data"
    assert frame_kind(BeamlineState(frame_type="Background")) == "dark"
    assert frame_kind(BeamlineState(frame_type="FlatField")) == "flat"
    with pytest.raises(ValueError, match="frame_type"):
        frame_kind(BeamlineState(frame_type="Dark"))


@pytest.mark.parametrize("kw, match", [
    (dict(sample="teapot"), "sample"),
    (dict(size_px=4), "size_px"),
    (dict(fill_static=1.5), "fill_static"),
    (dict(read_noise_counts=-1.0), "read_noise_counts"),
    (dict(steering_px_per_unit=((1.0, 0.0),)), "steering"),
    (dict(sample_detector_mm=50.0), "4 focal lengths"),
])
def test_bad_params_are_refused(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SimParams(**kw)


@pytest.mark.parametrize("kw, match", [
    (dict(energy_ev=20000.0), "energy_ev"),
    (dict(exposure_s=0.0), "exposure_s"),
    (dict(mode="low"), "mode"),
    (dict(shaker_amp_um=-1.0), "shaker_amp_um"),
    (dict(zp_z_um=float("nan")), "zp_z_um"),
    (dict(zp_z_um=-25000.0), "zp_z_um"),
])
def test_bad_states_are_refused(kw: dict, match: str) -> None:
    sim = make_sim(32)
    with pytest.raises(ValueError, match=match):
        sim.render(dataclasses.replace(sim.default_state(), **kw), 0.0)


def test_bad_time_is_refused() -> None:
    sim = make_sim(32)
    with pytest.raises(ValueError, match="t_s"):
        sim.render(sim.default_state(), -1.0)


def test_seeded_renders_are_reproducible() -> None:
    def frames(seed: int) -> list[np.ndarray]:
        sim = Simulator(SimParams(size_px=64, seed=seed, vibration_rms_nm=5.0))
        state = sim.default_state()
        return [sim.render(state, t)[0] for t in (0.0, 0.05, 0.1)]
    a, b, c = frames(3), frames(3), frames(4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0], a[1])  # fresh noise every frame


# ------------------------------------------------------------------ optics in the frames


def test_truth_follows_the_optics() -> None:
    sim = make_sim(64, focus_offset_um=3.0)
    state = sim.default_state()
    for energy in (6000.0, 8000.0, 12000.0):
        state.energy_ev = energy
        truth = sim.optics_truth(state)
        expect = (optics.in_focus_zp_um(energy) - optics.in_focus_zp_um(8000.0) + 3.0)
        assert truth["focus_z_um"] == pytest.approx(expect)
        assert truth["pixel_nm"] == pytest.approx(optics.pixel_nm(energy, 20.0))
        state.zp_z_um = truth["focus_z_um"]
        assert sim.optics_truth(state)["defocus_um"] == pytest.approx(0.0, abs=1e-6)
        state.zp_z_um = truth["focus_z_um"] + 5.0
        assert sim.optics_truth(state)["defocus_um"] == pytest.approx(5.0, rel=0.01)
    state.mode = "medium"
    state.energy_ev = 8000.0
    assert sim.optics_truth(state)["pixel_nm"] == pytest.approx(30.0, rel=0.01)


def test_defocus_lowers_high_frequency_power_and_cutoff() -> None:
    sim = make_sim(256, flux_counts_per_s=2e6)
    state = sim.default_state()
    ratios, cutoffs = {}, {}
    for z in (0.0, 4.0, -4.0, 8.0, -8.0):
        state.zp_z_um = z
        image, truth = sim.render(state, 0.0)
        freq, power = radial_power(image, truth["pixel_nm"])
        high = power[(freq > 20) & (freq < 35)].mean()
        low = power[(freq > 2) & (freq < 8)].mean()
        ratios[z], cutoffs[z] = high / low, cutoff(freq, power)
    assert 20.0 <= cutoffs[0.0] <= 40.0  # a focused 25 nm ZP, below Nyquist (50 µm⁻¹)
    for z in (4.0, 8.0):
        assert ratios[z] < 0.5 * ratios[0.0] and ratios[-z] < 0.5 * ratios[0.0]
        assert cutoffs[z] < cutoffs[0.0] - 3 and cutoffs[-z] < cutoffs[0.0] - 3
    assert ratios[8.0] < ratios[4.0] and cutoffs[8.0] < cutoffs[4.0]


def test_condenser_fill_extends_the_transfer_beyond_the_coherent_cutoff() -> None:
    sim = make_sim(256)
    state = sim.default_state()
    excess = []
    for fraction in (0.0, 0.5, 1.0):  # σ = 0.2, 0.6, 1: cut-off 24, 32, 40 µm⁻¹
        s = dataclasses.replace(state, shaker_amp_um=fraction * sim.params.fill_amp)
        image, truth = sim.render(s, 0.0)
        flat = sim.render(dataclasses.replace(s, frame_type="FlatField"), 0.0)[0]
        freq, power = radial_power((image - 100.0) / (flat - 100.0), truth["pixel_nm"])
        floor = np.median(power[(freq > 45) & (freq < 50)])
        excess.append(power[(freq > 26) & (freq < 34)].mean() / floor)
    assert excess[0] == pytest.approx(1.0, abs=0.1)  # nothing passes beyond 24 µm⁻¹
    assert excess[0] < excess[1] < excess[2]
    assert excess[2] > 1.4


def test_weak_phase_fringes_grow_with_defocus() -> None:
    sim = make_sim(256, sample="weak_phase", flux_counts_per_s=2e6)
    state = sim.default_state()
    flat, _ = sim.render(dataclasses.replace(state, frame_type="FlatField"), 0.0)
    yy, xx = np.mgrid[0:256, 0:256] - 127.5
    inner = np.hypot(yy, xx) < 64

    def contrast(z: float) -> float:
        image, _ = sim.render(dataclasses.replace(state, zp_z_um=z), 0.0)
        ratio = (image - 100.0) / (flat - 100.0)
        return float(ratio[inner].std())
    c = {z: contrast(z) for z in (0.0, 2.0, 4.0, 8.0, -4.0)}
    noise = math.sqrt(2 / float(np.mean(flat[inner] - 100.0)))  # photon noise of two frames
    assert c[0.0] < 2.0 * noise  # in focus: almost invisible
    assert c[0.0] < c[2.0] < c[4.0] < c[8.0]
    assert c[8.0] > 2.5 * c[0.0]
    assert c[-4.0] == pytest.approx(c[4.0], rel=0.2)


def test_zp_lateral_move_shifts_the_image() -> None:
    sim = make_sim(128)
    state = sim.default_state()
    a, truth = sim.render(state, 0.0)
    b, moved = sim.render(dataclasses.replace(state, zp_x_um=0.01), 0.0)
    expect = 10.0 * (1 + 1 / truth["magnification"]) / truth["pixel_nm"]
    dy, dx = shift_between(a.astype(float), b.astype(float))
    assert dx == pytest.approx(expect, abs=0.3) and abs(dy) < 0.3
    assert moved["beam_x_px"] == pytest.approx(expect)


# ------------------------------------------------------------------ sample, flats, darks


def test_sample_stage_moves_the_sample() -> None:
    sim = make_sim(128)
    state = sim.default_state()
    a, truth = sim.render(state, 0.0)
    b, _ = sim.render(dataclasses.replace(state, sample_x_um=0.1, sample_y_um=-0.05), 0.0)
    dy, dx = shift_between(a.astype(float), b.astype(float))
    assert dx == pytest.approx(100.0 / truth["pixel_nm"], abs=0.3)
    assert dy == pytest.approx(-50.0 / truth["pixel_nm"], abs=0.3)


def test_flat_frames_have_no_sample() -> None:
    sim = make_sim(128, flux_counts_per_s=2e6)
    state = sim.default_state()
    data, truth = sim.render(state, 0.0)
    assert truth["sample_in_view"] and truth["kind"] == "data"
    flat, truth_f = sim.render(dataclasses.replace(state, frame_type="FlatField"), 0.0)
    assert truth_f["kind"] == "flat" and not truth_f["sample_in_view"]
    far = dataclasses.replace(state, sample_x_um=3 * sim.field_um(state))
    out, truth_o = sim.render(far, 0.0)
    assert truth_o["kind"] == "data" and not truth_o["sample_in_view"]
    assert not sim.sample_in_view(far)

    ratio = (data - 100.0) / (flat - 100.0)
    assert ratio.min() < 0.8  # the star absorbs
    for other in (out,):
        r = (other - 100.0) / (flat - 100.0)
        noise = math.sqrt(2 / (flat - 100.0).mean())
        assert r.std() < 1.5 * noise and r.mean() == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("change", [
    dict(shutter_open=False), dict(ring_current_ma=0.0), dict(frame_type="Background")])
def test_dark_frames_hold_offset_and_read_noise_only(change: dict) -> None:
    sim = make_sim(128, read_noise_counts=2.0)
    image, truth = sim.render(dataclasses.replace(sim.default_state(), **change), 0.0)
    assert not truth["beam_on"] and truth["photons"] == 0.0
    assert image.mean() == pytest.approx(100.0, abs=0.05)
    assert image.std() == pytest.approx(math.sqrt(4.0 + 1 / 12), rel=0.05)
    assert truth["kind"] == ("dark" if "frame_type" in change else "data")


def test_poisson_statistics_on_a_flat_region() -> None:
    sim = make_sim(64, sample="blank", read_noise_counts=1.5)
    state = sim.default_state()
    stack = np.stack([sim.render(state, 0.05 * k)[0] for k in range(64)]).astype(np.float64)
    counts = stack - 100.0
    mean, var = counts.mean(axis=0), counts.var(axis=0, ddof=1)
    assert mean.min() > det.GAUSSIAN_MIN_COUNTS
    expect = mean + 1.5 ** 2 + 1 / 12
    assert np.mean(var / expect) == pytest.approx(1.0, abs=0.03)


def test_counts_scale_with_exposure_ring_current_and_pixel() -> None:
    sim = make_sim(32)
    state = sim.default_state()
    base = sim.render(state, 0.0)[1]["photons"]
    assert base == pytest.approx(sim.params.flux_counts_per_s * 0.05)
    assert sim.render(dataclasses.replace(state, exposure_s=0.1), 0.0)[1]["photons"] == \
        pytest.approx(2 * base)
    assert sim.render(dataclasses.replace(state, ring_current_ma=100.0), 0.0)[1]["photons"] == \
        pytest.approx(base / 2)
    medium = sim.render(dataclasses.replace(state, mode="medium"), 0.0)[1]["photons"]
    assert medium == pytest.approx(9 * base, rel=1e-6)


def test_saturation_clips_at_65535() -> None:
    sim = make_sim(64, flux_counts_per_s=3e7)
    image, _ = sim.render(sim.default_state(), 0.0)
    assert image.max() == 65535
    assert np.count_nonzero(image == 65535) > 100
    assert image.min() > 1000  # nothing wrapped around


# ------------------------------------------------------------------ illumination and beam


def test_whole_shaker_periods_give_a_repeatable_more_uniform_field() -> None:
    sim = make_sim(128, sample="blank", flux_counts_per_s=2e6)

    def flats(freq_hz: float) -> tuple[list[np.ndarray], list[float]]:
        state = dataclasses.replace(sim.default_state(), shaker_freq_hz=freq_hz)
        renders = [sim.render(state, t) for t in (0.0, 0.0123, 0.0371)]
        return [r[0] - 100.0 for r in renders], [r[1]["uniformity_cv"] for r in renders]
    whole, cv_whole = flats(40.0)  # 2 periods in 50 ms
    part, cv_part = flats(6.0)  # 0.3 of a period
    noise = math.sqrt(2 / whole[0].mean())
    assert np.std(whole[1] / whole[0]) < 1.3 * noise  # only photon noise differs
    assert np.std(part[1] / part[0]) > 10 * noise  # the field itself changed
    assert cv_whole[0] == cv_whole[1] == cv_whole[2]
    assert min(cv_part) > 3 * cv_whole[0]
    assert max(cv_part) - min(cv_part) > 0.002  # the arc's phase changes the field
    measured = whole[0].reshape(16, 8, 16, 8).mean(axis=(1, 3))
    assert measured.std() / measured.mean() == pytest.approx(cv_whole[0], rel=0.1)


def test_larger_shaker_amplitude_flattens_dims_and_fills() -> None:
    sim = make_sim(128, sample="blank")
    state = sim.default_state()
    cvs, peaks, fills = [], [], []
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5):
        image, truth = sim.render(
            dataclasses.replace(state, shaker_amp_um=fraction * sim.params.fill_amp), 0.0)
        blocks = (image - 100.0).reshape(16, 8, 16, 8).mean(axis=(1, 3))
        cvs.append(truth["uniformity_cv"])
        peaks.append(blocks.max())
        fills.append(truth["fill"])
    assert np.all(np.diff(cvs) < 0) and np.all(np.diff(peaks) < 0)
    assert cvs[0] > 0.15 and cvs[-1] < 0.025  # a hot spot, then a flat field
    assert fills[0] == sim.params.fill_static and fills[-2] == fills[-1] == 1.0
    assert np.all(np.diff(fills[:-1]) > 0)
    beyond = sim.render(dataclasses.replace(state, shaker_amp_um=2.5 * sim.params.fill_amp),
                        0.0)[1]
    assert beyond["fill"] == 1.0  # saturated; the field turns into a ring
    assert beyond["uniformity_cv"] > cvs[-1]


def centroid(image: np.ndarray) -> np.ndarray:
    a = image.astype(np.float64) - 100.0
    n = a.shape[0]
    y, x = np.mgrid[0:n, 0:n] - (n - 1) / 2
    return np.array([(a * x).sum(), (a * y).sum()]) / a.sum()


def test_steering_moves_the_spot_with_gain_and_coupling() -> None:
    matrix = ((8.0, 1.5), (-2.0, 12.0))
    sim = make_sim(256, sample="blank", spot_fwhm_um=0.6, spot_structure=0.0,
                   steering_px_per_unit=matrix)
    state = dataclasses.replace(sim.default_state(), shaker_amp_um=0.0)
    c0 = centroid(sim.render(state, 0.0)[0])
    for unit, column in ((dict(beam_x=1.5), 0), (dict(beam_y=-1.0), 1)):
        image, truth = sim.render(dataclasses.replace(state, **unit), 0.0)
        move = next(iter(unit.values()))
        expect = move * np.array(matrix)[:, column]
        np.testing.assert_allclose([truth["beam_x_px"], truth["beam_y_px"]], expect)
        np.testing.assert_allclose(centroid(image) - c0, expect, atol=0.2)


def test_drift_and_jumps_move_the_beam() -> None:
    sim = make_sim(128, sample="blank", drift_px_per_s=0.5, drift_angle_deg=90.0)
    state = sim.default_state()
    t0 = sim.render(state, 0.0)[1]
    t1 = sim.render(state, 20.0)[1]
    assert t1["beam_y_px"] - t0["beam_y_px"] == pytest.approx(10.0)
    assert t1["beam_x_px"] - t0["beam_x_px"] == pytest.approx(0.0, abs=1e-9)

    jumpy = make_sim(128, sample="blank", jump_px=20.0, jump_interval_s=10.0,
                     spot_structure=0.0)
    state = dataclasses.replace(jumpy.default_state(), shaker_amp_um=0.0)
    times = np.arange(0.0, 100.0, 0.5)
    path = np.array([jumpy.beam_offset_px(state, t) for t in times])
    steps = np.hypot(*np.diff(path, axis=0).T)
    np.testing.assert_allclose(steps[steps > 0], 20.0)
    assert 4 <= np.count_nonzero(steps > 0) <= 20  # ~10 jumps in 100 s
    # the path is a function of time only: asking again, or later first, changes nothing
    again = Simulator(jumpy.params)
    assert again.beam_offset_px(state, 73.0) == pytest.approx(jumpy.beam_offset_px(state, 73.0))
    assert again.beam_offset_px(state, 5.0) == pytest.approx(jumpy.beam_offset_px(state, 5.0))
    # and the frames follow the truth: centroids across the first jump
    first = int(np.argmax(steps > 0))
    narrow = make_sim(128, sample="blank", jump_px=20.0, jump_interval_s=10.0,
                      spot_structure=0.0, spot_fwhm_um=0.3)
    (before, tb), (after, ta) = (narrow.render(state, times[k]) for k in (first, first + 1))
    moved = np.array([ta["beam_x_px"] - tb["beam_x_px"], ta["beam_y_px"] - tb["beam_y_px"]])
    assert np.hypot(*moved) == pytest.approx(20.0)
    np.testing.assert_allclose(centroid(after) - centroid(before), moved, atol=0.5)


def test_vibration_shifts_each_frame() -> None:
    sim = make_sim(128, vibration_rms_nm=30.0, flux_counts_per_s=2e6)
    state = sim.default_state()
    flat = sim.render(dataclasses.replace(state, frame_type="FlatField"), 0.0)[0] - 100.0
    renders = [sim.render(state, 0.05 * k) for k in range(6)]
    ref, ref_truth = renders[0]
    pixel = ref_truth["pixel_nm"]
    for image, truth in renders[1:]:
        # flat-corrected: the illumination does not vibrate with the sample
        dy, dx = shift_between((ref - 100.0) / flat, (image - 100.0) / flat)
        assert dx == pytest.approx((truth["vibration_x_nm"] - ref_truth["vibration_x_nm"])
                                   / pixel, abs=0.35)
        assert dy == pytest.approx((truth["vibration_y_nm"] - ref_truth["vibration_y_nm"])
                                   / pixel, abs=0.35)
    draws = np.array([sim.render(state, 0.0)[1]["vibration_x_nm"] for _ in range(200)])
    assert draws.std() == pytest.approx(30.0, rel=0.15)


def test_sinusoidal_vibration_along_x() -> None:
    sim = make_sim(32, vibration_sine_nm=7.0, vibration_sine_hz=5.0)
    state = dataclasses.replace(sim.default_state(), exposure_s=0.01)
    t = 0.05 - 0.005  # mid-exposure at a quarter period
    truth = sim.render(state, t)[1]
    assert truth["vibration_x_nm"] == pytest.approx(7.0)
    assert truth["vibration_y_nm"] == 0.0


def test_a_flattened_field_hides_the_beam_from_the_centre_of_mass_not_from_its_top() -> None:
    # Why the pipeline's beam centroid defaults to the brightest 10 % ([metrics]
    # centroid_fraction = 0.9): on a field the shaker has flattened to ~1.5 %, the centre of
    # mass barely moves with the beam; the top of the illumination still does.
    from stream.metrics import MetricsConfig, MetricsEngine

    sim = make_sim(256)
    flat = dataclasses.replace(sim.default_state(), shaker_amp_um=1.55 * sim.params.fill_amp)
    assert sim.render(flat, 0.0)[1]["uniformity_cv"] < 0.02
    sensitivity = {}
    for fraction in (0.0, 0.9):
        engine = MetricsEngine(MetricsConfig(centroid_fraction=fraction))
        x, beam = [], []
        for steer in (0.0, 0.5):  # 0.5 steering units: 5 px of beam motion
            image, truth = sim.render(dataclasses.replace(flat, beam_x=steer), 0.0)
            x.append(engine.cheap(image.astype(np.float32))["centroid_x_px"])
            beam.append(truth["beam_x_px"])
        sensitivity[fraction] = (x[1] - x[0]) / (beam[1] - beam[0])
    assert 0.0 < sensitivity[0.0] < 0.1
    assert sensitivity[0.9] > 0.25 and sensitivity[0.9] > 5 * sensitivity[0.0]
