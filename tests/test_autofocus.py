"""ZP autofocus: the curve fit and its verdicts, and the procedure against the simulator.

The procedure runs on :class:`tests.feedback_bench.SimBench` (the simulator behind a test
stand-in for the executor) and, for the property test, :class:`~tests.feedback_bench.ScriptedBench`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.simbench import SimBench, default_guard, sim_params
from feedback.autofocus import AutofocusConfig, autofocus, fit_focus
from feedback.commands import (
    Acquire,
    Done,
    Move,
    Verdict,
    drive,
)
from feedback.optics import ZonePlate
from feedback.safety import Guard, RoleLimits
from tests.feedback_bench import ScriptedBench, metric_values

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ZP = ZonePlate()
DOF_8KEV = ZP.dof_um(8000.0)


# ---------------------------------------------------------------------------- fit_focus


def gaussian_curve(z: np.ndarray, center: float, width: float, amplitude: float = 1.0,
                   baseline: float = 0.05) -> np.ndarray:
    return baseline + amplitude * np.exp(-0.5 * ((z - center) / width) ** 2)


def test_fit_focus_recovers_a_noisy_gaussian_with_calibrated_uncertainty():
    rng = np.random.default_rng(1)
    z = np.linspace(-24.0, 24.0, 9)
    pulls = []
    for _ in range(200):
        center = rng.uniform(-8.0, 8.0)
        scores = gaussian_curve(z, center, 8.0) + rng.normal(0.0, 0.02, z.size)
        fit = fit_focus(z, scores, dof_um=8.0)
        assert fit.verdict == Verdict.RESOLVED, fit.reason
        assert abs(fit.best_z_um - center) < 1.0
        pulls.append((fit.best_z_um - center) / fit.uncertainty_um)
    # The uncertainty is an honest 1σ: pulls have unit spread (residual-scaled, 5 dof).
    assert 0.7 < np.std(pulls) < 1.5


def test_fit_focus_known_errors_and_any_order():
    z = np.array([4.0, -4.0, 0.0, 8.0, -8.0, 12.0, -12.0])
    scores = gaussian_curve(z, 1.5, 6.0)
    fit = fit_focus(z, scores, score_err=0.01, dof_um=8.0)
    assert fit.verdict == Verdict.RESOLVED
    assert fit.best_z_um == pytest.approx(1.5, abs=1e-3)
    assert fit.uncertainty_um < 0.1
    assert fit.as_dict()["verdict"] == "resolved"


def test_fit_focus_noise_is_flat_never_a_number():
    rng = np.random.default_rng(2)
    z = np.linspace(-24.0, 24.0, 7)
    for _ in range(50):
        fit = fit_focus(z, 1e-6 * rng.normal(size=z.size) + 3e-7, dof_um=8.0)
        assert fit.verdict == Verdict.FLAT, fit.reason
        assert fit.best_z_um is None and fit.uncertainty_um is None
    fit = fit_focus(z, np.full(z.size, 2.0))
    assert fit.verdict == Verdict.FLAT
    strong = gaussian_curve(z, 0.0, 8.0)
    assert fit_focus(z, strong, structure=False).verdict == Verdict.FLAT


def test_fit_focus_two_lobes_are_ambiguous():
    z = np.linspace(-24.0, 24.0, 9)
    lobes = gaussian_curve(z, -9.0, 4.0, 1.0, 0.0) + gaussian_curve(z, 10.0, 4.0, 0.9, 0.0)
    fit = fit_focus(z, lobes, dof_um=8.0)
    assert fit.verdict == Verdict.AMBIGUOUS, fit.reason
    assert fit.best_z_um is None
    assert len(fit.peaks_um) == 2
    # A two-lobed curve that no single peak fits: ambiguous when the images show structure.
    z7 = np.linspace(-24.0, 24.0, 7)
    lobes7 = gaussian_curve(z7, -9.0, 4.0, 1.0, 0.0) + gaussian_curve(z7, 12.0, 4.0, 1.0, 0.0)
    assert fit_focus(z7, lobes7, dof_um=8.0, structure=True).verdict == Verdict.AMBIGUOUS


def test_fit_focus_edge_peak_is_railed_and_bad_width_ambiguous():
    z = np.linspace(-24.0, 24.0, 7)
    rising = gaussian_curve(z, 30.0, 10.0)
    fit = fit_focus(z, rising, dof_um=8.0)
    assert fit.verdict == Verdict.RAILED, fit.reason
    assert fit.best_z_um is None
    z_fine = np.linspace(-24.0, 24.0, 25)
    narrow = gaussian_curve(z_fine, 0.0, 1.0)
    assert fit_focus(z_fine, narrow, dof_um=8.0).verdict == Verdict.AMBIGUOUS
    assert fit_focus(z_fine, narrow).verdict == Verdict.RESOLVED


@pytest.mark.parametrize("z, s, match", [
    ([0, 1, 2, 3], [1, 2, 3, 4], "at least 5"),
    ([0, 1, 2, 3, 4], [1, 2, np.nan, 4, 5], "finite"),
    ([0, 1, 2, 3, 4], [1, 2, 3, 4], "equal length"),
    ([0, 0, 1, 1, 2], [1, 2, 3, 4, 5], "distinct"),
])
def test_fit_focus_rejects_bad_input(z, s, match):
    with pytest.raises(ValueError, match=match):
        fit_focus(z, s)


def test_fit_focus_sls_zone_plate_scan_is_resolved():
    """Real STXM focus scan (SLS, 715 eV, 35 nm zones): the edge is sharpest at ZP-Z index 16."""
    h5py = pytest.importorskip("h5py")
    path = DATA / "sls-zp-focus-scan" / "Focus_2021-03-16_051.hdf5"
    if not path.exists():
        pytest.skip(f"real data not present: {path}")
    with h5py.File(path, "r") as f:
        lines = f["entry1/counter0/data"][()]
        zp_um = f["entry1/control/zone_plate"][()]
    # Gradient energy along each 25-point line across the edge: a 1-D Brenner score.
    scores = np.sum(np.diff(lines, axis=1) ** 2, axis=1)
    fit = fit_focus(zp_um, scores)
    assert fit.verdict == Verdict.RESOLVED, fit.reason
    assert fit.best_z_um == pytest.approx(-4562.48, abs=3.0)  # the best measured position
    assert fit.uncertainty_um < 3.0  # half a 6 µm scan step


# ---------------------------------------------------------------------------- procedure


def run_autofocus(start_dof: float, *, offset_um: float = 3.0, guard: Guard | None = None,
                  config: AutofocusConfig | None = None, **params: Any
                  ) -> tuple[Done, SimBench]:
    bench = SimBench(sim_params(focus_offset_um=offset_um, **params), guard or default_guard())
    bench.actuators["zp_z_um"].move(offset_um + start_dof * DOF_8KEV)
    done = bench.run(autofocus(bench.guard, ZP, config))
    return done, bench


@pytest.mark.parametrize("start_dof, offset_um, seed", [
    (-2.0, 3.0, 1), (-1.2, -5.0, 2), (0.0, 0.0, 3), (0.7, 4.0, 4), (1.6, -2.0, 5), (2.0, 1.0, 6),
])
def test_autofocus_normal_dose_within_a_tenth_of_the_dof(start_dof, offset_um, seed):
    done, bench = run_autofocus(start_dof, offset_um=offset_um, seed=seed)
    truth = bench.truth()["focus_z_um"]
    res = done.result
    assert done.verdict == Verdict.RESOLVED, done.reason
    assert abs(res["best_z_um"] - truth) <= DOF_8KEV / 10
    assert res["frames_used"] <= 15
    assert res["uncertainty_um"] < DOF_8KEV / 10
    assert bench.actuators["zp_z_um"].position == pytest.approx(res["best_z_um"])
    assert res["start_z_um"] == pytest.approx(offset_um + start_dof * DOF_8KEV)
    assert bench.guard.refusals == []


@pytest.mark.parametrize("start_dof, seed", [(-1.8, 11), (1.5, 12), (0.4, 13)])
def test_autofocus_low_dose_averages_and_stays_within_a_fifth_of_the_dof(start_dof, seed):
    done, bench = run_autofocus(start_dof, seed=seed, flux_counts_per_s=4.0e3)  # ~100 counts/px
    raw_mean = bench.sim.render(bench.current_state(), 0.0)[0].mean() - 100.0
    assert 70 < raw_mean < 150
    truth = bench.truth()["focus_z_um"]
    assert done.verdict == Verdict.RESOLVED, done.reason
    assert abs(done.result["best_z_um"] - truth) <= DOF_8KEV / 5


def test_autofocus_very_low_dose_averages_frames_instead_of_guessing():
    done, bench = run_autofocus(-1.0, seed=52, flux_counts_per_s=0.5e3)  # ~12 counts/px
    truth = bench.truth()["focus_z_um"]
    assert done.verdict == Verdict.RESOLVED, done.reason
    assert abs(done.result["best_z_um"] - truth) <= DOF_8KEV / 5
    assert done.result["frames_used"] > 15
    assert any("frames per point" in log.message for log in bench.logs)


def test_autofocus_blank_sample_is_flat_and_returns_to_start():
    done, bench = run_autofocus(1.0, sample="blank")
    assert done.verdict == Verdict.FLAT, done.reason
    assert done.result["best_z_um"] is None and done.result["uncertainty_um"] is None
    assert bench.actuators["zp_z_um"].position == pytest.approx(done.result["start_z_um"])


@pytest.mark.parametrize("start_dof", [-1.5, 0.0, 1.0])
def test_autofocus_weak_phase_gives_truth_or_ambiguous_never_a_fringe(start_dof):
    done, bench = run_autofocus(start_dof, sample="weak_phase")
    truth = bench.truth()["focus_z_um"]
    if done.verdict == Verdict.RESOLVED:
        assert abs(done.result["best_z_um"] - truth) <= DOF_8KEV / 10
    else:
        assert done.verdict == Verdict.AMBIGUOUS, done.reason
        assert bench.actuators["zp_z_um"].position == pytest.approx(done.result["start_z_um"])


def test_autofocus_expands_once_when_railed():
    done, bench = run_autofocus(-4.5, seed=7)
    truth = bench.truth()["focus_z_um"]
    assert done.verdict == Verdict.RESOLVED, done.reason
    assert abs(done.result["best_z_um"] - truth) <= DOF_8KEV / 10
    assert any("expanding" in log.message for log in bench.logs)


def test_autofocus_railed_at_a_soft_limit_returns_to_start():
    # Focus at +3 µm, but z may not go above -20 µm: the peak lies beyond the limit.
    guard = default_guard(zp_z_um=RoleLimits(-200.0, -20.0, 30.0, 0.05))
    done, bench = run_autofocus(-4.0, guard=guard)
    assert done.verdict == Verdict.RAILED, done.reason
    assert bench.actuators["zp_z_um"].position == pytest.approx(done.result["start_z_um"])
    assert all(m.target <= -20.0 for m in bench.moves)


def test_autofocus_drops_frames_taken_before_the_move_finished():
    bench = SimBench(sim_params(focus_offset_um=2.0, seed=8), default_guard(), leak_stale=True)
    bench.actuators["zp_z_um"].move(2.0 - 1.5 * DOF_8KEV)
    done = bench.run(autofocus(bench.guard, ZP))
    truth = bench.truth()["focus_z_um"]
    assert done.verdict == Verdict.RESOLVED
    assert abs(done.result["best_z_um"] - truth) <= DOF_8KEV / 10
    dropped = [log for log in bench.logs if log.message.startswith("autofocus: dropped")]
    assert len(dropped) >= 10
    assert all("not after the move" in r for log in dropped for r in log.data["reasons"])
    # Every used point sits at a commanded position, none at the stale (previous) one.
    targets = {round(m.target, 6) for m in bench.moves} | {round(done.result["start_z_um"], 6)}
    assert all(round(z, 6) in targets for z, _ in done.result["points"])


def test_autofocus_ioc_disconnect_aborts_with_no_further_puts():
    bench = SimBench(sim_params(), default_guard(), fail_on_move=4)
    done = bench.run(autofocus(bench.guard, ZP))
    assert done.verdict == Verdict.ABORTED
    assert "ConnectionError" in done.reason
    failed_at = next(i for i, c in enumerate(bench.commands)
                     if isinstance(c, Move) and c not in bench.moves)
    assert not any(isinstance(c, Move | Acquire) for c in bench.commands[failed_at + 1:])
    assert len(bench.moves) == 3


def test_autofocus_operator_abort_stops_without_moving():
    bench = SimBench(sim_params(), default_guard())
    bench.abort_on_acquire = 3
    done = bench.run(autofocus(bench.guard, ZP))
    assert done.verdict == Verdict.ABORTED and "operator abort" in done.reason
    last_acquire = max(i for i, c in enumerate(bench.commands) if isinstance(c, Acquire))
    assert not any(isinstance(c, Move) for c in bench.commands[last_acquire:])


def test_autofocus_beam_loss_aborts_and_returns_to_start():
    bench = SimBench(sim_params(), default_guard())
    bench.actuators["zp_z_um"].move(5.0)

    def lose_beam(b: SimBench) -> None:
        if b.frames >= 4:
            b.state = replace(b.state, ring_current_ma=0.0)
    bench.before_frame = lose_beam
    done = bench.run(autofocus(bench.guard, ZP))
    assert done.verdict == Verdict.ABORTED
    assert "beam loss" in done.reason
    assert bench.actuators["zp_z_um"].position == pytest.approx(5.0)


# ---------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=metric_values, start=st.floats(-150.0, 150.0),
       max_step=st.floats(0.5, 40.0), high=st.floats(-100.0, 200.0))
def test_property_autofocus_never_commands_outside_limits_or_above_max_step(
        values, start, max_step, high):
    low = -200.0
    start = min(start, high)
    guard = default_guard(zp_z_um=RoleLimits(low, max(high, low + 1.0), max_step, 0.05))
    bench = ScriptedBench(guard, {"zp_z_um": min(start, max(high, low + 1.0))}, values)
    done = drive(autofocus(guard, ZP), bench.handle)
    assert isinstance(done.verdict, Verdict)
    assert guard.refusals == []
    if done.verdict != Verdict.RESOLVED:
        assert done.result["best_z_um"] is None
    assert math.isfinite(bench.position["zp_z_um"])
