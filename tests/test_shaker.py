"""Shaker tuning: whole periods per exposure, smallest amplitude meeting the flat-field target."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.simbench import SimBench, default_guard, sim_params
from feedback.commands import Move, Verdict, drive
from feedback.safety import RoleLimits
from feedback.shaker import ShakerConfig, tune_shaker, whole_period_frequency
from tests.feedback_bench import ScriptedBench, metric_values

FIELD_UM = 2.5455  # reference field of view of the 256-px simulator, µm


@pytest.mark.parametrize("freq, exposure, limits, periods, expected", [
    (45.0, 0.05, (1.0, 500.0), 1, (40.0, 2)),
    (10.0, 0.05, (1.0, 500.0), 1, (20.0, 1)),
    (75.0, 0.02, (1.0, 500.0), 1, (100.0, 2)),  # 1.5 periods rounds to 2
    (40.0, 0.05, (1.0, 500.0), 3, (60.0, 3)),
    (40.0, 0.05, (50.0, 70.0), 1, (60.0, 3)),
    (40.0, 0.001, (1.0, 500.0), 1, None),  # no whole period fits in 1 ms below 500 Hz
    (40.0, 0.05, (45.0, 55.0), 1, None),
])
def test_whole_period_frequency(freq, exposure, limits, periods, expected):
    got = whole_period_frequency(freq, exposure, limits, periods)
    if expected is None:
        assert got is None
    else:
        assert got[0] == pytest.approx(expected[0]) and got[1] == expected[1]
        assert got[0] * exposure == pytest.approx(round(got[0] * exposure))
    with pytest.raises(ValueError, match="exposure_s"):
        whole_period_frequency(freq, 0.0, limits)


def shaker_bench(spot_fwhm_fields: float | None = None, **kw) -> SimBench:
    """The simulator's condenser (or a spot ``spot_fwhm_fields`` field widths wide), parked."""
    guard = default_guard(shaker_amp_um=RoleLimits(0.0, 4.0, 5.0, 0.001))
    spot = None if spot_fwhm_fields is None else spot_fwhm_fields * FIELD_UM
    bench = SimBench(sim_params(spot_fwhm_um=spot, **kw), guard)
    bench.actuators["shaker_amp_um"].move(0.0)  # parked: a hot spot
    bench.actuators["shaker_freq_hz"].move(45.0)  # 2.25 periods per 50 ms exposure
    return bench


def flat_truth(bench: SimBench) -> dict:
    return bench.sim.render(replace(bench.current_state(), frame_type="FlatField"), bench.t_s)[1]


def test_tuning_from_a_hot_spot_reaches_two_percent():
    bench = shaker_bench()
    assert flat_truth(bench)["uniformity_cv"] > 0.1  # a visible hot spot to start from
    done = bench.run(tune_shaker(bench.guard))
    res = done.result
    assert done.verdict == Verdict.RESOLVED, done.reason
    assert res["frequency_hz"] == pytest.approx(40.0) and res["periods_per_exposure"] == 2
    assert res["uniformity_cv"] <= 0.02
    truth = flat_truth(bench)
    assert truth["uniformity_cv"] <= 0.02  # the simulator's own field CV agrees
    assert truth["fill"] == pytest.approx(1.0)  # and the aperture is filled
    assert bench.actuators["shaker_amp_um"].position == pytest.approx(res["amplitude_um"])
    # Smallest: the scanned amplitudes below the result did not reach the target.
    below = [p for p in res["probes"] if p["amplitude_um"] < res["amplitude_um"] - 0.01]
    assert below and all(p["uniformity_cv"] > 0.02 * 0.75 for p in below)
    assert bench.guard.refusals == []


def test_unreachable_target_is_ambiguous_and_restores_the_start():
    # A condenser spot 0.7 field widths wide on a circle cannot get below ~6 %.
    bench = shaker_bench(spot_fwhm_fields=0.7, spot_structure=0.1)
    done = bench.run(tune_shaker(bench.guard))
    assert done.verdict == Verdict.AMBIGUOUS, done.reason
    assert done.result["uniformity_cv"] > 0.02
    assert bench.actuators["shaker_amp_um"].position == 0.0
    assert bench.actuators["shaker_freq_hz"].position == 45.0


def test_no_light_is_flat_and_moves_nothing():
    bench = shaker_bench()
    bench.state = replace(bench.state, ring_current_ma=0.0)
    done = bench.run(tune_shaker(bench.guard, ShakerConfig(dark_counts=100.0)))
    assert done.verdict == Verdict.FLAT, done.reason
    assert bench.moves == []


def test_stale_flats_are_dropped_and_a_disconnect_aborts():
    bench = shaker_bench(seed=4)
    bench.leak_stale = True
    done = bench.run(tune_shaker(bench.guard, ShakerConfig(measure_na_fill=False)))
    assert done.verdict == Verdict.RESOLVED, done.reason
    assert flat_truth(bench)["uniformity_cv"] <= 0.02
    bench = shaker_bench()
    bench.fail_on_move = 3
    done = bench.run(tune_shaker(bench.guard))
    assert done.verdict == Verdict.ABORTED and "ConnectionError" in done.reason
    refused = [c for c in bench.commands if isinstance(c, Move) and c not in bench.moves]
    assert len(refused) == 1 and bench.commands[-1] is not refused[0]
    assert not any(isinstance(c, Move) for c in
                   bench.commands[bench.commands.index(refused[0]) + 1:])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=metric_values, amp_step=st.floats(0.05, 5.0), amp_high=st.floats(0.5, 50.0),
       freq=st.floats(1.0, 500.0))
def test_property_shaker_never_commands_outside_limits_or_above_max_step(
        values, amp_step, amp_high, freq):
    guard = default_guard(shaker_amp_um=RoleLimits(0.0, amp_high, amp_step, 0.001),
                          shaker_freq_hz=RoleLimits(1.0, 500.0, 50.0, 0.01))
    bench = ScriptedBench(guard, {"shaker_amp_um": 0.0, "shaker_freq_hz": freq}, values)
    done = drive(tune_shaker(guard), bench.handle)
    assert isinstance(done.verdict, Verdict)
    assert guard.refusals == []
