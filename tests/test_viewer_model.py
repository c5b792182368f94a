"""The viewer's view model: status text, contrast, staleness, traces, scale bar, coordinates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.previews import PSD_FLOOR, preview_message, preview_sequence
from viewers.model import (
    CONTRAST_SAMPLES,
    ScaleBar,
    Trace,
    ViewModel,
    contrast_limits,
    full_to_preview,
    loop_states,
    psd_curve,
    scale_bar,
    status_text,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- status text ------------------------------------------------------------------------------
def test_status_text_reports_the_input_counters_exactly():
    msg = preview_message(1234, counters={"dropped": 7, "rejected_total": 3, "gaps": 12},
                          status={"fps": 95.24,
                                  "latency_ms": {"p50": 3.14, "p90": 5.0, "p99": 8.66,
                                                 "max": 20.0},
                                  "af_state": "scanning", "af_verdict": "resolved",
                                  "beamfb_state": "tracking"})
    assert status_text(msg) == (
        "seq 1234  |  95.2 fps  |  latency p50 3.1 ms p99 8.7 ms  |  dropped 7  |  rejected 3  |"
        "  gaps 12  |  af scanning (resolved)  |  beamfb tracking")


def test_status_text_missing_values_stale_and_paused():
    msg = preview_message(5, status={"fps": None,
                                     "latency_ms": {"p50": None, "p90": None, "p99": None,
                                                    "max": None}})
    del msg["counters"]["gaps"]
    text = status_text(msg, age_s=3.25, stale=True, paused=True)
    assert text == ("seq 5  |  – fps  |  latency p50 – ms p99 – ms  |  dropped 0  |  rejected 0"
                    "  |  gaps –  |  PAUSED  |  STALE 3.2 s")
    assert status_text(None) == "waiting for previews"
    assert status_text(None, 4.0) == "waiting for previews (4.0 s)"


def test_loop_states_group_state_and_verdict_by_loop():
    status = {"fps": 1.0, "af_state": "idle", "shaker_verdict": "flat", "af_verdict": "railed",
              "latency_ms": {}, "_state": "no loop name", "beamfb_state": 3}
    assert loop_states(status) == {"af": ("idle", "railed"), "shaker": (None, "flat")}


# -- contrast ---------------------------------------------------------------------------------
def test_contrast_ignores_nan_and_inf_pixels():
    rng = np.random.default_rng(3)
    image = rng.normal(100.0, 10.0, (64, 64)).astype(np.float32)
    finite = image.copy()
    image[rng.random(image.shape) < 0.2] = np.nan
    image[0, :5] = np.inf
    image[1, :5] = -np.inf
    expect = np.percentile(image[np.isfinite(image)], [2.0, 98.0])
    lo, hi = contrast_limits(image, 2.0, 98.0)
    np.testing.assert_allclose((lo, hi), expect, rtol=1e-6)
    # the NaNs really were ignored: the limits differ from nanpercentile-free garbage
    assert math.isfinite(lo) and math.isfinite(hi) and lo < 100.0 < hi
    assert (lo, hi) != tuple(np.percentile(finite, [2.0, 98.0]))


def test_contrast_edge_cases_and_errors():
    assert contrast_limits(np.full((4, 4), 7, np.uint16)) == (6.5, 7.5)
    assert contrast_limits(np.full((4, 4), np.nan)) == (0.0, 1.0)
    assert contrast_limits(np.arange(101, dtype=np.int32).reshape(1, -1), 0, 100) == (0.0, 100.0)
    with pytest.raises(ValueError, match="percentiles"):
        contrast_limits(np.zeros((2, 2)), 50, 50)
    with pytest.raises(ValueError, match="percentiles"):
        contrast_limits(np.zeros((2, 2)), -1, 99)
    with pytest.raises(TypeError, match="numeric"):
        contrast_limits(np.array([["a"]]))


def test_contrast_of_a_large_image_is_sampled_but_close():
    rng = np.random.default_rng(4)
    image = rng.normal(0.0, 1.0, (1024, 1024)).astype(np.float32)
    assert image.size > CONTRAST_SAMPLES
    lo, hi = contrast_limits(image, 1.0, 99.0)
    exact = np.percentile(image, [1.0, 99.0])
    np.testing.assert_allclose((lo, hi), exact, atol=0.02)


def test_model_contrast_follows_the_adjustable_clip_and_resets():
    model = ViewModel(clip_pct=(1.0, 99.0))
    image = np.arange(10000, dtype=np.float32).reshape(100, 100)
    model.update(preview_message(0, image=image))
    np.testing.assert_allclose(model.contrast(), np.percentile(image, [1.0, 99.0]))
    model.scale_clip(2.0)
    assert model.clip_pct == (2.0, 98.0)
    np.testing.assert_allclose(model.contrast(), np.percentile(image, [2.0, 98.0]))
    model.scale_clip(0.25)
    assert model.clip_pct == pytest.approx((0.5, 99.5))
    model.reset_contrast()
    assert model.clip_pct == (1.0, 99.0)
    for _ in range(10):  # tails that would swallow the histogram are refused
        model.scale_clip(4.0)
    assert model.clip_pct[1] - model.clip_pct[0] > 1.0
    with pytest.raises(ValueError, match="factor"):
        model.scale_clip(0)


# -- staleness --------------------------------------------------------------------------------
def test_staleness_after_the_configured_time():
    clock = FakeClock()
    model = ViewModel(stale_s=2.0, clock=clock)
    assert model.is_stale() and model.age_s() is None
    clock.now += 1.5
    assert model.status_text() == "waiting for previews (1.5 s)"
    model.update(preview_message(0))
    assert model.age_s() == 0.0 and not model.is_stale()
    clock.now += 1.99
    assert not model.is_stale() and "STALE" not in model.status_text()
    clock.now += 0.02
    assert model.is_stale()
    assert model.status_text().endswith("STALE 2.0 s")
    model.update(preview_message(1))
    assert not model.is_stale()
    with pytest.raises(ValueError, match="stale_s"):
        ViewModel(stale_s=0)


# -- traces -----------------------------------------------------------------------------------
def test_traces_append_and_trim_to_their_length():
    model = ViewModel(trace_len=5)
    msgs = preview_sequence(8)
    for msg in msgs:
        assert model.update(msg)
    assert not model.update(msgs[-1])  # the same seq again changes nothing
    for trace in model.traces.values():
        assert len(trace) == 5
    t, v = model.traces["vibration_nm"].arrays()
    np.testing.assert_allclose(v, [12.0 + 0.1 * s for s in range(3, 8)])
    np.testing.assert_allclose(t - t[-1], [-0.4, -0.3, -0.2, -0.1, 0.0], atol=1e-6)
    _, focus = model.traces["focus"].arrays()
    np.testing.assert_allclose(focus, [0.05 + 0.001 * s for s in range(3, 8)])
    _, res = model.traces["resolution_nm"].arrays()
    np.testing.assert_allclose(res, [1e3 / (2 * (20.0 + 0.1 * s)) for s in range(3, 8)])
    assert model.previews == 8


def test_missing_metrics_become_gaps_and_latest_skips_them():
    model = ViewModel(focus_key="tenengrad")
    model.update(preview_message(0, metrics={"tenengrad": 3.0}))
    model.update(preview_message(1, metrics={"tenengrad": None, "resolution_nm": float("nan")}))
    _, v = model.traces["focus"].arrays()
    assert v[0] == 3.0 and math.isnan(v[1])
    assert model.traces["focus"].latest == 3.0
    assert math.isnan(model.traces["resolution_nm"].arrays()[1][1])
    with pytest.raises(ValueError, match="trace length"):
        Trace(1)


# -- scale bar --------------------------------------------------------------------------------
@pytest.mark.parametrize(("pixel_nm", "width_px", "length_um", "label"), [
    (40.0, 128, 1.0, "1 µm"),          # 5.12 µm field → ≤ 1.28 µm
    (10.0, 2048, 5.0, "5 µm"),         # 20.48 µm → ≤ 5.12
    (26.0, 512, 2.0, "2 µm"),          # 13.3 µm → ≤ 3.33
    (1000.0, 100, 20.0, "20 µm"),      # 100 µm → ≤ 25
    (1.0, 100, 0.02, "0.02 µm"),       # 0.1 µm → ≤ 0.025
    (3.0, 1000, 0.5, "0.5 µm"),        # 3 µm → ≤ 0.75
])
def test_scale_bar_is_round_and_has_the_right_pixel_length(pixel_nm, width_px, length_um,
                                                             label):
    bar = scale_bar(pixel_nm, width_px)
    assert bar == ScaleBar(length_um, pytest.approx(length_um * 1e3 / pixel_nm), label)


def test_scale_bar_is_the_largest_round_length_that_fits():
    for pixel_nm in np.geomspace(0.7, 3000.0, 57):
        bar = scale_bar(float(pixel_nm), 640, fraction=0.3)
        mantissa = bar.length_um / 10.0 ** math.floor(math.log10(bar.length_um) + 1e-9)
        assert round(mantissa, 9) in (1.0, 2.0, 5.0)
        longest_px = 0.3 * 640
        # the next round length (×2 or ×2.5) would not fit
        assert longest_px / 2.5 - 1e-9 <= bar.length_px <= longest_px + 1e-9
    with pytest.raises(ValueError, match="pixel_nm"):
        scale_bar(0.0, 100)
    with pytest.raises(ValueError, match="width_px"):
        scale_bar(10.0, 0)


def test_model_scale_bar_uses_the_binned_pixel_size():
    model = ViewModel()
    assert model.scale_bar() is None
    model.update(preview_message(0, shape=(128, 128), bin_factor=4, pixel_nm=10.0))
    assert model.scale_bar() == scale_bar(40.0, 128)
    model.update(preview_message(1, metrics={}) | {"pixel_nm": None})
    assert model.scale_bar() is None


# -- geometry: ROI, centroid, setpoint, beam error --------------------------------------------
def test_full_frame_pixels_map_onto_preview_coordinates():
    # full-frame pixels 0..3 are preview pixel 0 ([0, 1)); their centre 1.5 is at 0.5
    assert full_to_preview(1.5, 4) == 0.5
    assert full_to_preview(-0.5, 4) == 0.0
    model = ViewModel()
    msg = preview_message(0, shape=(100, 120), bin_factor=4,
                          metrics={"metrics_roi": [40, 80, 200, 160],
                                   "centroid_x_px": 241.5, "centroid_y_px": 101.5},
                          status={"beamfb_setpoint_x_px": 243.5,
                                  "beamfb_setpoint_y_px": 191.5})
    model.update(msg)
    assert model.roi_rect() == (20.0, 10.0, 60.0, 60.0)
    assert model.centroid() == (60.5, 25.5)
    assert model.setpoint() == (full_to_preview(243.5, 4), full_to_preview(191.5, 4))
    assert model.beam_error_px() == (241.5 - 243.5, 101.5 - 191.5)
    t, ex = model.traces["beam_x_err_px"].arrays()
    assert ex[-1] == -2.0 and model.traces["beam_y_err_px"].latest == -90.0


def test_without_setpoint_the_error_is_from_the_field_centre():
    model = ViewModel()
    metrics = {"metrics_roi": None, "centroid_x_px": 300.0, "centroid_y_px": None}
    model.update(preview_message(0, shape=(100, 120), bin_factor=4, metrics=metrics,
                                 status={"beamfb_setpoint_x_px": None}))
    assert model.setpoint() is None and model.roi_rect() is None and model.centroid() is None
    assert model.beam_error_px() == (300.0 - 239.5, None)


# -- PSD --------------------------------------------------------------------------------------
def test_psd_curve_from_the_metrics_and_its_label():
    curve = psd_curve(preview_message(10))
    assert curve is not None and curve.freqs_per_um.shape == curve.psd.shape == (150,)
    assert curve.floor == PSD_FLOOR and curve.cutoff_per_um == pytest.approx(21.0)
    assert curve.label == f"{1e3 / 42.0:.1f} ± 0.8 nm (resolved)"
    # signal meets the floor at the cut-off: PSD there is ~2 × floor
    at = np.interp(curve.cutoff_per_um, curve.freqs_per_um, curve.psd)
    assert at == pytest.approx(2 * PSD_FLOOR, rel=0.05)
    flat = psd_curve(preview_message(0, metrics={"resolution_nm": None, "psd_verdict": "flat"}))
    assert flat.label == "no resolution (flat)"


def test_psd_curve_absent_or_malformed_is_none():
    assert psd_curve(preview_message(0, with_psd=False)) is None
    assert psd_curve(preview_message(0, metrics={"psd": [1.0, 2.0]})) is None
    assert psd_curve(preview_message(0, metrics={"psd": "junk"})) is None


# -- input validation -------------------------------------------------------------------------
def test_update_rejects_bad_previews_with_a_clear_message():
    model = ViewModel()
    msg = preview_message(0)
    with pytest.raises(ValueError, match="lacks 'bin'"):
        model.update({k: v for k, v in msg.items() if k != "bin"})
    with pytest.raises(ValueError, match="does not match shape"):
        model.update(msg | {"shape": [3, 3]})
    with pytest.raises(ValueError, match="percentiles"):
        ViewModel(clip_pct=(5.0, 1.0))
    assert model.message is None and model.previews == 0
