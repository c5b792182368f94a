"""The metrics engine: key names, JSON-ability, agreement with the functions, state, threads."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from stream.beam import bin_image, illumination_uniformity
from stream.focus import brenner, normalized_variance, tenengrad, vollath_f4
from stream.metrics import (
    CHEAP_KEYS,
    EXPENSIVE_KEYS,
    METRIC_KEYS,
    MetricsConfig,
    MetricsEngine,
    roi_slices,
)
from stream.psd import radial_psd
from tests.synthetic import fourier_shift, gaussian_blur, poisson_image, siemens_star

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

BRIEF_KEYS = {
    "cutoff_per_um", "resolution_nm", "resolution_err_nm", "cutoff_x_per_um", "cutoff_y_per_um",
    "band_power", "normalized_variance", "brenner", "tenengrad", "vollath_f4", "centroid_x_px",
    "centroid_y_px", "centroid_x_um", "centroid_y_um", "total_counts", "mean_counts",
    "uniformity_cv", "na_fill", "psd_verdict", "shift_x_px", "shift_y_px", "vibration_nm",
}


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    """1024² frame: a blurred Siemens star (10 nm pixels) on a Gaussian illumination, counts."""
    star = siemens_star((1024, 1024), 10.0, n_spokes=36, outer_fraction=0.3)
    yy, xx = np.mgrid[0:1024, 0:1024]
    illum = np.exp(-((yy - 480.0) ** 2 + (xx - 560.0) ** 2) / (2 * 400.0**2))
    return poisson_image(gaussian_blur(star, 20.0, 10.0) * illum, 3000.0, seed=70)


def assert_plain(result: dict) -> None:
    json.dumps(result, allow_nan=False)
    for key, value in result.items():
        assert value is None or type(value) in (float, str), (key, type(value))


def test_key_sets_are_exactly_the_named_metrics(frame):
    engine = MetricsEngine()
    assert set(METRIC_KEYS) == BRIEF_KEYS
    assert not set(CHEAP_KEYS) & set(EXPENSIVE_KEYS)
    cheap = engine.cheap(frame)
    expensive = engine.expensive(frame)
    assert set(cheap) == set(CHEAP_KEYS)
    assert set(expensive) == set(EXPENSIVE_KEYS)
    assert set(engine.compute_all(frame)) == BRIEF_KEYS
    assert_plain(cheap)
    assert_plain(expensive)


def test_values_agree_with_the_functions_on_the_default_roi(frame):
    engine = MetricsEngine(MetricsConfig(dr_nm=25.0))
    result = engine.compute_all(frame, pixel_nm=10.0)
    roi = frame[roi_slices(None, frame.shape)]
    assert roi.shape == (512, 512) and roi_slices(None, frame.shape)[0].start == 256
    assert result["normalized_variance"] == pytest.approx(normalized_variance(roi), rel=1e-9)
    assert result["brenner"] == pytest.approx(brenner(roi), rel=1e-9)
    assert result["tenengrad"] == pytest.approx(tenengrad(roi), rel=1e-9)
    assert result["vollath_f4"] == pytest.approx(vollath_f4(roi), rel=1e-9)
    psd = radial_psd(roi, 10.0, dr_nm=25.0)
    assert result["psd_verdict"] == psd.verdict == "resolved"
    assert result["resolution_nm"] == pytest.approx(psd.resolution_nm)
    assert result["resolution_err_nm"] == pytest.approx(psd.resolution_err_nm)
    assert result["cutoff_x_per_um"] == pytest.approx(psd.cutoff_x_per_um)
    assert result["band_power"] == pytest.approx(psd.band_power)
    assert result["na_fill"] == pytest.approx(psd.na_fill)
    assert result["total_counts"] == pytest.approx(float(frame.sum(dtype=np.float64)), rel=1e-9)
    assert result["mean_counts"] == pytest.approx(float(frame.mean(dtype=np.float64)), rel=1e-9)
    binned = bin_image(frame, 8)
    assert result["uniformity_cv"] == pytest.approx(illumination_uniformity(
        binned, MetricsConfig().uniformity_sigma_px, MetricsConfig().fov_fraction))


def test_centroid_in_full_frame_pixels_and_um_from_the_centre():
    yy, xx = np.mgrid[0:2048, 0:2048]
    spot = 5.0 + 1000.0 * np.exp(-((yy - 700.3) ** 2 + (xx - 1300.6) ** 2) / (2 * 60.0**2))
    engine = MetricsEngine(MetricsConfig(centroid_fraction=0.05))
    result = engine.cheap(spot.astype(np.float32), pixel_nm=20.0)
    assert result["centroid_y_px"] == pytest.approx(700.3, abs=0.1)
    assert result["centroid_x_px"] == pytest.approx(1300.6, abs=0.1)
    assert result["centroid_y_um"] == pytest.approx((700.3 - 1023.5) * 0.02, abs=0.005)
    assert result["centroid_x_um"] == pytest.approx((1300.6 - 1023.5) * 0.02, abs=0.005)


def test_shift_and_vibration_follow_the_stream():
    base = poisson_image(gaussian_blur(siemens_star((512, 512), 10.0, n_spokes=18), 15.0, 10.0),
                         2000.0, seed=71)
    engine = MetricsEngine(MetricsConfig(jitter_window=10))
    first = engine.expensive(base)
    assert first["shift_x_px"] is None and first["vibration_nm"] is None
    rng = np.random.default_rng(72)
    positions = np.cumsum(rng.normal(0, 0.5, (6, 2)), axis=0)
    previous = np.zeros(2)
    for k, (dy, dx) in enumerate(positions):
        result = engine.expensive(fourier_shift(base, dy, dx))
        assert result["shift_y_px"] == pytest.approx(dy - previous[0], abs=0.05)
        assert result["shift_x_px"] == pytest.approx(dx - previous[1], abs=0.05)
        previous = np.array([dy, dx])
        assert (result["vibration_nm"] is None) == (k < 2)
    t = np.arange(7)
    track = np.vstack([[0.0, 0.0], positions]) * 10.0
    resid = track - np.array([np.polyval(np.polyfit(t, track[:, i], 1), t) for i in (0, 1)]).T
    assert result["vibration_nm"] == pytest.approx(np.sqrt(np.mean(np.sum(resid**2, 1))),
                                                   abs=0.5)
    engine.reset()
    assert engine.expensive(base)["shift_x_px"] is None
    # A new pixel size is a new geometry: no shift across the change.
    engine.expensive(base, pixel_nm=10.0)
    assert engine.expensive(base, pixel_nm=20.0)["shift_x_px"] is None


def test_noise_only_frames_give_no_shift_and_no_resolution():
    rng = np.random.default_rng(73)
    engine = MetricsEngine()
    engine.expensive(rng.poisson(1000.0, (600, 600)).astype(np.float32))
    result = engine.compute_all(rng.poisson(1000.0, (600, 600)).astype(np.float32))
    assert result["shift_x_px"] is None and result["shift_y_px"] is None
    assert result["psd_verdict"] == "no_signal"
    assert result["resolution_nm"] is None and result["cutoff_per_um"] is None
    assert_plain(result)


def test_non_finite_pixels_and_small_frames():
    rng = np.random.default_rng(74)
    img = rng.poisson(500.0, (100, 90)).astype(np.float32)
    img[10, 10] = np.nan
    img[50, :] = np.inf
    before = img.copy()
    result = MetricsEngine().compute_all(img)
    np.testing.assert_array_equal(img, before)
    assert set(result) == BRIEF_KEYS
    assert result["total_counts"] == pytest.approx(float(np.sum(img[np.isfinite(img)],
                                                                dtype=np.float64)))
    assert all(result[k] is not None for k in ("brenner", "tenengrad", "uniformity_cv"))
    assert_plain(result)


def test_explicit_roi_and_validation():
    img = np.random.default_rng(75).poisson(100.0, (300, 400)).astype(np.uint16)
    engine = MetricsEngine(MetricsConfig(roi=(10, 20, 64, 128)))
    result = engine.expensive(img)
    assert result["brenner"] == pytest.approx(brenner(img[10:74, 20:148]), rel=1e-9)
    with pytest.raises(ValueError, match="does not fit"):
        MetricsEngine(MetricsConfig(roi=(250, 0, 64, 64))).expensive(img)
    with pytest.raises(ValueError, match="2-D"):
        engine.cheap(np.zeros(10))
    with pytest.raises(TypeError, match="dtype"):
        engine.expensive(np.zeros((64, 64), dtype=complex))
    with pytest.raises(ValueError, match="pixel_nm"):
        engine.cheap(img, pixel_nm=-1.0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"roi": (0, 0, 16, 64)}, "roi"),
    ({"pixel_nm": 0.0}, "pixel_nm"),
    ({"dr_nm": 0.0}, "dr_nm"),
    ({"band_per_um": (10.0, 5.0)}, "band_per_um"),
    ({"threshold": 0.5}, "threshold"),
    ({"bin_factor": 0}, "bin_factor"),
    ({"centroid_fraction": 1.0}, "centroid_fraction"),
    ({"uniformity_sigma_px": 0.0}, "uniformity_sigma_px"),
    ({"fov_fraction": 0.0}, "fov_fraction"),
    ({"shift_px": 8}, "shift_px"),
    ({"jitter_window": 2}, "jitter_window"),
])
def test_bad_configuration_names_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetricsConfig(**kwargs)


def test_cheap_and_expensive_run_concurrently(frame):
    engine = MetricsEngine()
    frames = [frame, fourier_shift(frame, 0.5, -0.3).astype(np.float32)] * 4
    reference = MetricsEngine()
    expected_expensive = [reference.expensive(f) for f in frames]
    sequential = MetricsEngine()
    expected_cheap = [sequential.cheap(f) for f in frames]
    got_expensive: list[dict] = []
    errors: list[BaseException] = []

    def side() -> None:
        try:
            got_expensive.extend(engine.expensive(f) for f in frames)
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread below
            errors.append(exc)

    thread = threading.Thread(target=side)
    thread.start()
    got_cheap = [engine.cheap(f) for f in frames]
    thread.join()
    assert not errors
    assert got_expensive == expected_expensive
    assert got_cheap == expected_cheap


def test_roi_view_and_expensive_roi_as_the_pipeline_uses_them(frame):
    engine = MetricsEngine()
    view = engine.roi_view(frame)
    assert view.shape == (512, 512) and np.shares_memory(view, frame)
    assert engine.expensive_roi(view.copy(), 10.0) == MetricsEngine().expensive(frame, 10.0)


def test_warm_up_leaves_a_fresh_state(frame):
    engine = MetricsEngine()
    engine.warm_up(frame.shape, dtypes=(np.float32,))
    assert engine.expensive(frame)["shift_x_px"] is None


def test_read_only_frames_as_decoded_from_the_wire(frame):
    wire = np.frombuffer(frame.astype(np.uint16).tobytes(), dtype=np.uint16).reshape(frame.shape)
    assert not wire.flags.writeable
    assert MetricsEngine().compute_all(wire) == MetricsEngine().compute_all(wire.copy())


def test_xradia_frame_through_the_reader():
    readers = pytest.importorskip("stream.readers")
    path = DATA / "xradia-txm" / "test_chip00.xrm"
    if not path.exists():
        pytest.skip(f"real data not present: {path}")
    data = [f for f in readers.open_series(path) if f.kind == "data"]
    assert data
    frame = data[0]
    pixel_nm = float(frame.attrs["pixel_nm"])
    assert pixel_nm == pytest.approx(77.9, abs=0.1)
    result = MetricsEngine(MetricsConfig(centroid_fraction=0.7)).compute_all(frame.image, pixel_nm)
    assert_plain(result)
    assert result["psd_verdict"] == "resolved"
    assert 2 * pixel_nm < result["resolution_nm"] < 1000.0
    # The bright condenser spot sits near row 228, column 290 of the 512² image.
    assert np.hypot(result["centroid_y_px"] - 228, result["centroid_x_px"] - 290) < 8.0
